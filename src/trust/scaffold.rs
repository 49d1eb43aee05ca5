//! The scaffold: a ready-to-run snippet for an agent, in Python, TypeScript, Rust or curl, that
//! fetches the agent's token with the client-credentials grant and calls the API; and a `.env`
//! template with the client id, token URL and scopes. Never the secret: it was shown once, when
//! the credential was made, and the template leaves its line for the developer to fill in.

use axum::{Json, extract::State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::{Actor, directory},
    http::{ApiError, ApiResult, error::Problem, extract::ApiQuery},
    state::AppState,
};

/// The snippet's language.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    Python,
    Typescript,
    Rust,
    Curl,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ScaffoldQuery {
    pub agent_id: Uuid,
    /// `python`, `typescript`, `rust` or `curl`.
    pub lang: Lang,
}

/// A snippet and its environment.
#[derive(Debug, Serialize, ToSchema)]
pub struct Scaffold {
    pub agent_id: Uuid,
    pub lang: Lang,
    /// What to save the code as.
    pub filename: String,
    pub code: String,
    /// The `.env` template; `AGENTIDP_CLIENT_SECRET` is left for you to fill in.
    pub env: String,
    /// How to run it, from the directory holding both files.
    pub run: String,
}

const PYTHON: &str = r##""""Fetches a token for the agent and calls the AgentIdP API (standard library only)."""
import base64
import json
import os
import urllib.parse
import urllib.request


def load_env(path=".env"):
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                os.environ.setdefault(key.strip(), value.strip())


def main():
    load_env()
    client_id = os.environ["AGENTIDP_CLIENT_ID"]
    secret = os.environ["AGENTIDP_CLIENT_SECRET"]
    form = {"grant_type": "client_credentials"}
    if os.environ.get("AGENTIDP_SCOPES"):
        form["scope"] = os.environ["AGENTIDP_SCOPES"]
    basic = base64.b64encode(
        f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(secret, safe='')}".encode()
    ).decode()
    request = urllib.request.Request(
        os.environ["AGENTIDP_TOKEN_URL"],
        data=urllib.parse.urlencode(form).encode(),
        headers={"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        token = json.load(response)["access_token"]
    me = urllib.request.Request(
        os.environ["AGENTIDP_API_URL"] + "/auth/me", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(me, timeout=30) as response:
        print(json.dumps(json.load(response), indent=2))


if __name__ == "__main__":
    main()
"##;

const TYPESCRIPT: &str = r#"// Fetches a token for the agent and calls the AgentIdP API. Node 20+ (built-in fetch):
//   node --env-file=.env --experimental-strip-types agent.ts
const env = process.env;

async function main(): Promise<void> {
  const form = new URLSearchParams({ grant_type: "client_credentials" });
  if (env.AGENTIDP_SCOPES) form.set("scope", env.AGENTIDP_SCOPES);
  const basic = Buffer.from(
    `${encodeURIComponent(env.AGENTIDP_CLIENT_ID!)}:${encodeURIComponent(env.AGENTIDP_CLIENT_SECRET!)}`,
  ).toString("base64");
  const tokenResponse = await fetch(env.AGENTIDP_TOKEN_URL!, {
    method: "POST",
    headers: { Authorization: `Basic ${basic}`, "Content-Type": "application/x-www-form-urlencoded" },
    body: form,
  });
  if (!tokenResponse.ok) throw new Error(`token: ${tokenResponse.status} ${await tokenResponse.text()}`);
  const { access_token } = (await tokenResponse.json()) as { access_token: string };
  const me = await fetch(`${env.AGENTIDP_API_URL}/auth/me`, { headers: { Authorization: `Bearer ${access_token}` } });
  console.log(JSON.stringify(await me.json(), null, 2));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
"#;

const RUST: &str = r#"//! Fetches a token for the agent and calls the AgentIdP API.
//! Cargo.toml: reqwest = { version = "0.12", features = ["blocking", "json"] }, serde_json = "1",
//! dotenvy = "0.15". Run: cargo run
use std::env::var;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    dotenvy::dotenv().ok();
    let client = reqwest::blocking::Client::new();
    let mut form = vec![("grant_type", "client_credentials".to_owned())];
    if let Ok(scopes) = var("AGENTIDP_SCOPES") {
        if !scopes.is_empty() {
            form.push(("scope", scopes));
        }
    }
    let token: serde_json::Value = client
        .post(var("AGENTIDP_TOKEN_URL")?)
        .basic_auth(var("AGENTIDP_CLIENT_ID")?, Some(var("AGENTIDP_CLIENT_SECRET")?))
        .form(&form)
        .send()?
        .error_for_status()?
        .json()?;
    let access_token = token["access_token"].as_str().ok_or("no access_token")?;
    let me: serde_json::Value = client
        .get(format!("{}/auth/me", var("AGENTIDP_API_URL")?))
        .bearer_auth(access_token)
        .send()?
        .error_for_status()?
        .json()?;
    println!("{}", serde_json::to_string_pretty(&me)?);
    Ok(())
}
"#;

const CURL: &str = r#"#!/usr/bin/env bash
# Fetches a token for the agent and calls the AgentIdP API (curl and sed only).
set -euo pipefail
set -a; . ./.env; set +a
args=(-d grant_type=client_credentials)
if [[ -n ${AGENTIDP_SCOPES:-} ]]; then args+=(--data-urlencode "scope=$AGENTIDP_SCOPES"); fi
response=$(curl -fsS -u "$AGENTIDP_CLIENT_ID:$AGENTIDP_CLIENT_SECRET" "${args[@]}" "$AGENTIDP_TOKEN_URL")
token=$(printf '%s' "$response" | sed -E 's/.*"access_token":"([^"]+)".*/\1/')
curl -fsS -H "Authorization: Bearer $token" "$AGENTIDP_API_URL/auth/me"
echo
"#;

/// The `.env` template: no value holds a quote, a space or a newline (ids, URLs and scope names
/// are all checked tokens), so every language's reader parses it the same way.
fn env_template(base: &str, agent_name: &str, client_id: Option<&str>, scopes: &[String]) -> String {
    let name: String = agent_name.chars().filter(|c| !c.is_control()).take(100).collect();
    let client_line = match client_id {
        Some(id) => format!("AGENTIDP_CLIENT_ID={id}\n"),
        None => {
            "# The agent has no live credential yet: create one, then fill in its client id.\nAGENTIDP_CLIENT_ID=\n"
                .to_owned()
        }
    };
    format!(
        "# AgentIdP agent: {name}\n{client_line}\
         # The secret was shown once, when the credential was made. Paste it here; never commit this file.\n\
         AGENTIDP_CLIENT_SECRET=\n\
         AGENTIDP_TOKEN_URL={base}/api/v1/token\n\
         AGENTIDP_API_URL={base}\n\
         AGENTIDP_SCOPES={}\n",
        scopes.join(" ")
    )
}

/// A ready-to-run snippet and `.env` template for one of the organization's agents.
#[utoipa::path(get, path = "/api/v1/scaffold", tag = "trust", params(ScaffoldQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Scaffold), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem)))]
pub(super) async fn get_scaffold(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<ScaffoldQuery>,
) -> ApiResult<Json<Scaffold>> {
    let org_id = actor.current_org()?;
    let agent = directory::agent_profile(state.db(), q.agent_id)
        .await?
        .filter(|a| a.org_id == org_id)
        .ok_or(ApiError::NotFound)?;
    let client_ids = directory::agent_client_ids(state.db(), org_id, agent.id).await?;
    let base = state.config().server.public_url.trim_end_matches('/');
    // The env values are used unquoted: only well-formed scope names pass (they always are).
    let scopes: Vec<String> = agent
        .allowed_scopes
        .iter()
        .filter(|s| s.chars().all(|c| c.is_ascii_graphic() && c != '"' && c != '\'' && c != '\\'))
        .cloned()
        .collect();
    let env = env_template(base, &agent.name, client_ids.first().map(String::as_str), &scopes);
    let (filename, code, run) = match q.lang {
        Lang::Python => ("agent.py", PYTHON, "python3 agent.py"),
        Lang::Typescript => ("agent.ts", TYPESCRIPT, "node --env-file=.env --experimental-strip-types agent.ts"),
        Lang::Rust => ("src/main.rs", RUST, "cargo run"),
        Lang::Curl => ("agent.sh", CURL, "bash agent.sh"),
    };
    Ok(Json(Scaffold {
        agent_id: agent.id,
        lang: q.lang,
        filename: filename.into(),
        code: code.into(),
        env,
        run: run.into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_env_template_never_holds_a_secret_and_tolerates_hostile_names() {
        let env = env_template("https://idp.example.com", "evil\nAGENTIDP_TOKEN_URL=https://x", Some("agt_1"), &[]);
        assert!(env.contains("AGENTIDP_CLIENT_SECRET=\n"));
        assert_eq!(env.lines().filter(|l| l.starts_with("AGENTIDP_TOKEN_URL=")).count(), 1, "{env}");
        assert!(env.contains("AGENTIDP_TOKEN_URL=https://idp.example.com/api/v1/token\n"));
    }
}
