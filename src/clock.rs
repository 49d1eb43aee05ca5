//! The application's wall clock: it stamps tokens (`iat`, `exp`) and revocation watermarks, checks
//! token lifetimes, and names the day and month of quota counters. One clock for all of them, so a
//! revocation cuts off exactly the tokens issued before it; tests move it, production never does.

use std::sync::atomic::{AtomicI64, Ordering};

use time::{Date, Month, OffsetDateTime, Time};

/// The current UTC time, plus an offset that only tests change.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ns: AtomicI64,
}

impl Clock {
    pub fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc() + time::Duration::nanoseconds(self.offset_ns.load(Ordering::Relaxed))
    }

    /// Makes `now()` read `at` (and run on from there).
    pub fn set(&self, at: OffsetDateTime) {
        let offset = (at - OffsetDateTime::now_utc()).whole_nanoseconds() as i64;
        self.offset_ns.store(offset, Ordering::Relaxed);
    }
}

/// The next 00:00 UTC after `now`.
pub fn next_midnight(now: OffsetDateTime) -> OffsetDateTime {
    let date = now.date().next_day().unwrap_or(Date::MAX);
    date.with_time(Time::MIDNIGHT).assume_utc()
}

/// 00:00 UTC on the first day of the month after `now`'s.
pub fn next_month(now: OffsetDateTime) -> OffsetDateTime {
    let (year, month) = match now.month() {
        Month::December => (now.year() + 1, Month::January),
        m => (now.year(), m.next()),
    };
    Date::from_calendar_date(year, month, 1).unwrap_or(Date::MAX).with_time(Time::MIDNIGHT).assume_utc()
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn boundaries_are_utc_midnights() {
        assert_eq!(next_midnight(datetime!(2026-12-31 23:59:59 UTC)), datetime!(2027-01-01 00:00 UTC));
        assert_eq!(next_month(datetime!(2026-12-31 23:59:59 UTC)), datetime!(2027-01-01 00:00 UTC));
        assert_eq!(next_month(datetime!(2028-02-29 00:00 UTC)), datetime!(2028-03-01 00:00 UTC));
    }

    #[test]
    fn a_set_clock_runs_on_from_there() {
        let c = Clock::default();
        c.set(datetime!(2030-01-01 23:59:59 UTC));
        let now = c.now();
        assert!(now >= datetime!(2030-01-01 23:59:59 UTC) && now < datetime!(2030-01-02 00:00:01 UTC));
    }
}
