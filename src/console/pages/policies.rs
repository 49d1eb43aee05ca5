//! Policies: the organization's versions and which is active, one version's source, a diff
//! between two versions, the dry-run tester, activate and roll back.

use askama::Template;
use axum::{
    extract::{Path, Query},
    response::Response,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{items, text};
use crate::console::{Shell, Submitted, Viewer, api::Failure, done, render};

pub struct VersionView {
    pub version: i64,
    pub status: String,
    pub created_at: String,
    pub created_by: String,
    pub activated_at: String,
}

/// One line of a diff: `' '` kept, `'-'` only in the first, `'+'` only in the second.
pub struct DiffLine {
    pub op: char,
    pub text: String,
}

pub struct ResultView {
    pub name: String,
    pub expected: String,
    pub effect: String,
    pub reason: String,
    pub passed: bool,
}

#[derive(Template)]
#[template(path = "console/policies.html")]
pub struct PoliciesPage {
    pub shell: Shell,
    pub versions: Vec<VersionView>,
    pub shown: Option<(i64, String)>,
    pub diff: Option<(i64, i64, Vec<DiffLine>)>,
    pub can_manage: bool,
    pub examples: String,
    pub test_version: i64,
    pub results: Option<(bool, Vec<ResultView>)>,
}

#[derive(Deserialize, Default)]
pub struct PolicyQuery {
    v: Option<i64>,
    a: Option<i64>,
    b: Option<i64>,
    done: Option<String>,
}

/// A line diff by longest common subsequence (sources are small; beyond 2,000 lines a side the
/// two are shown whole, one removed and one added).
pub fn diff(a: &str, b: &str) -> Vec<DiffLine> {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let line = |op, t: &str| DiffLine { op, text: t.to_owned() };
    if a.len() > 2000 || b.len() > 2000 {
        return a.iter().map(|t| line('-', t)).chain(b.iter().map(|t| line('+', t))).collect();
    }
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        if a[i] == b[j] {
            out.push(line(' ', a[i]));
            i += 1;
            j += 1;
        } else if lcs[i + 1][j] >= lcs[i][j + 1] {
            out.push(line('-', a[i]));
            i += 1;
        } else {
            out.push(line('+', b[j]));
            j += 1;
        }
    }
    out.extend(a[i..].iter().map(|t| line('-', t)));
    out.extend(b[j..].iter().map(|t| line('+', t)));
    out
}

async fn source(viewer: &Viewer, version: i64) -> Result<String, Failure> {
    let v = viewer.api.get(&viewer.caller, &format!("/api/v1/policies/versions/{version}")).await?;
    Ok(text(&v, "source"))
}

/// A starting example for the tester: you, reading your organization.
fn example(viewer: &Viewer) -> String {
    let org = viewer.org_id().map(|o| o.to_string()).unwrap_or_default();
    let roles: Vec<&str> = viewer.role().map(|r| vec![r.as_str()]).unwrap_or_default();
    let example = json!([{ "name": "I read my organization", "expect": "permit",
        "request": { "actor": { "actor_id": viewer.actor.actor_id(), "actor_type": "human", "org_ids": [org], "roles": roles },
                     "action": "read", "resource": { "type": "organization", "id": org } } }]);
    serde_json::to_string_pretty(&example).unwrap_or_default()
}

async fn page(
    viewer: &Viewer,
    q: &PolicyQuery,
    results: Option<(bool, Vec<ResultView>)>,
    examples: String,
    test_version: Option<i64>,
) -> Response {
    let list = match viewer.api.get(&viewer.caller, "/api/v1/policies/versions").await {
        Ok(l) => l,
        Err(e) => return viewer.failed(e, "policies"),
    };
    let versions: Vec<VersionView> = items(&list, "")
        .iter()
        .map(|v| VersionView {
            version: v.get("version").and_then(Value::as_i64).unwrap_or(0),
            status: text(v, "status"),
            created_at: text(v, "created_at"),
            created_by: text(v, "created_by"),
            activated_at: text(v, "activated_at"),
        })
        .collect();
    let shown = match q.v {
        Some(v) => match source(viewer, v).await {
            Ok(s) => Some((v, s)),
            Err(e) => return viewer.failed(e, "policies"),
        },
        None => None,
    };
    let diff = match (q.a, q.b) {
        (Some(a), Some(b)) => match (source(viewer, a).await, source(viewer, b).await) {
            (Ok(sa), Ok(sb)) => Some((a, b, diff(&sa, &sb))),
            (Err(e), _) | (_, Err(e)) => return viewer.failed(e, "policies"),
        },
        _ => None,
    };
    let can_manage = viewer.org_id().is_some_and(|org_id| {
        viewer.can("manage", crate::policy::Resource::PolicySet { org_id }, org_id.to_string(), "policies:write")
    });
    let newest = versions.first().map(|v| v.version).unwrap_or(1);
    render(PoliciesPage {
        shell: viewer.shell("Policies", "policies").with_notice(q.done.as_deref()),
        versions,
        shown,
        diff,
        can_manage,
        examples: if examples.is_empty() { example(viewer) } else { examples },
        test_version: test_version.unwrap_or(newest),
        results,
    })
}

/// `GET /console/policies` (`?v=N` shows a version, `?a=N&b=M` diffs two).
pub async fn list(viewer: Viewer, Query(q): Query<PolicyQuery>) -> Response {
    page(&viewer, &q, None, String::new(), None).await
}

#[derive(Deserialize)]
pub struct TestForm {
    version: i64,
    #[serde(default)]
    examples: String,
}

/// `POST /console/policies/test`: the dry-run tester (reads only; the form has a CSRF token like
/// every other).
pub async fn test(Submitted { viewer, form }: Submitted<TestForm>) -> Response {
    let examples: Value = match serde_json::from_str(&form.examples) {
        Ok(v) => v,
        Err(e) => {
            let failure = Failure {
                status: 400,
                code: "invalid_examples".into(),
                detail: format!("The examples are not JSON: {e}"),
                request_id: crate::http::request_id::current_request_id().unwrap_or_default(),
            };
            return viewer.failed(failure, "policies");
        }
    };
    let path = format!("/api/v1/policies/versions/{}/test", form.version);
    let report = match viewer.api.post(&viewer.caller, &path, &json!({ "examples": examples })).await {
        Ok(r) => r,
        Err(e) => return viewer.failed(e, "policies"),
    };
    let results = items(&report, "results")
        .iter()
        .map(|r| ResultView {
            name: text(r, "name"),
            expected: text(r, "expected"),
            effect: text(r, "effect"),
            reason: text(r, "reason"),
            passed: r.get("passed").and_then(Value::as_bool).unwrap_or(false),
        })
        .collect();
    let passed = report.get("passed").and_then(Value::as_bool).unwrap_or(false);
    page(&viewer, &PolicyQuery::default(), Some((passed, results)), form.examples, Some(form.version)).await
}

#[derive(Deserialize)]
pub struct Empty {}

/// `POST /console/policies/{version}/activate`.
pub async fn activate(Path(version): Path<i64>, Submitted { viewer, .. }: Submitted<Empty>) -> Response {
    match viewer.api.post_empty(&viewer.caller, &format!("/api/v1/policies/versions/{version}/activate")).await {
        Ok(_) => done("/console/policies", "activated"),
        Err(e) => viewer.failed(e, "policies"),
    }
}

/// `POST /console/policies/rollback`.
pub async fn rollback(Submitted { viewer, .. }: Submitted<Empty>) -> Response {
    match viewer.api.post_empty(&viewer.caller, "/api/v1/policies/rollback").await {
        Ok(_) => done("/console/policies", "rolled_back"),
        Err(e) => viewer.failed(e, "policies"),
    }
}

#[cfg(test)]
mod tests {
    use super::diff;

    #[test]
    fn a_diff_keeps_common_lines_and_marks_the_rest() {
        let d = diff("a\nb\nc", "a\nc\nd");
        let ops: String = d.iter().map(|l| l.op).collect();
        let texts: Vec<&str> = d.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(ops, " - +");
        assert_eq!(texts, ["a", "b", "c", "d"]);
    }
}

#[derive(Deserialize)]
pub struct DraftForm {
    #[serde(default)]
    source: String,
}

/// `POST /console/policies/versions`: a new draft version (validated by the API).
pub async fn create(Submitted { viewer, form }: Submitted<DraftForm>) -> Response {
    match viewer.api.post(&viewer.caller, "/api/v1/policies/versions", &json!({ "source": form.source })).await {
        Ok(v) => {
            done(&format!("/console/policies?v={}", v.get("version").and_then(Value::as_i64).unwrap_or(0)), "created")
        }
        Err(e) => viewer.failed(e, "policies"),
    }
}
