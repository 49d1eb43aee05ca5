//! Keyset pagination shared by every listing: a bounded page size, and one extra row fetched to
//! know whether another page exists.

use super::{ApiError, ApiResult};

/// The page size: 1 to 200, default 50.
pub fn limit(requested: Option<i64>) -> ApiResult<i64> {
    let limit = requested.unwrap_or(50);
    if (1..=200).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::bad_request("invalid_query", "limit must be between 1 and 200"))
    }
}

/// Trims the extra row (queries fetch `limit + 1`) and gives the cursor of the last item kept when
/// there is more.
pub fn page<T, C>(mut items: Vec<T>, limit: i64, cursor: impl Fn(&T) -> C) -> (Vec<T>, Option<C>) {
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next = if more { items.last().map(cursor) } else { None };
    (items, next)
}

#[cfg(test)]
mod tests {
    #[test]
    fn pages() {
        assert_eq!(super::page(vec![1, 2, 3], 2, |x| *x), (vec![1, 2], Some(2)));
        assert_eq!(super::page(vec![1, 2], 2, |x| *x), (vec![1, 2], None));
        assert!(super::limit(Some(0)).is_err() && super::limit(Some(201)).is_err());
        assert_eq!(super::limit(None).unwrap(), 50);
    }
}
