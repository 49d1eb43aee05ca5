//! A real headless Chromium, driven over the W3C WebDriver protocol through Debian's
//! `chromedriver`. The protocol is plain HTTP and JSON, so this speaks it with reqwest rather than
//! pulling in a WebDriver crate. `scripts/services.sh` installs `chromium` and `chromium-driver`.
//!
//! Each [`Browser`] owns its own chromedriver process (on a free loopback port) and one session,
//! and stops both when dropped.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn chromedriver() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CHROMEDRIVER") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"].into_iter().map(PathBuf::from).find(|p| p.exists())
}

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium", "/usr/lib/chromium/chromium"].into_iter().map(PathBuf::from).find(|p| p.exists())
}

/// Where screenshots go: under the build's target directory, never committed.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

pub struct Browser {
    driver: Child,
    http: reqwest::Client,
    base: String,
    _profile: TempDir,
}

/// A throwaway directory for the browser profile, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A found element.
#[derive(Clone, Debug)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver and a headless Chromium session at the given window size.
    /// Panics with a clear message when Chromium is not installed (run `make services`).
    pub async fn start(width: u32, height: u32) -> Browser {
        let driver_bin = chromedriver().expect("chromedriver not found: `make test` installs chromium-driver");
        let chrome_bin = chromium().expect("chromium not found: `make test` installs chromium");
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = std::env::temp_dir().join(format!("agentidp-browser-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&profile).unwrap();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        // chromedriver takes a moment to listen.
        let mut ready = false;
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("{base}/status")).send().await
                && r.status().is_success()
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "chromedriver did not start on port {port}");
        let mut browser = Browser { driver, http, base, _profile: TempDir(profile.clone()) };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chrome_bin,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-extensions", "--disable-background-networking",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let resp = browser.http.post(format!("{}/session", browser.base)).json(&caps).send().await.unwrap();
        let body: Value = resp.json().await.unwrap();
        let id = body["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("WebDriver session refused: {body}"))
            .to_owned();
        browser.base = format!("{}/session/{id}", browser.base);
        browser
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("WebDriver {path}: {e}"));
        let v: Value = resp.json().await.unwrap();
        if let Some(err) = v["value"].get("error") {
            panic!("WebDriver {path}: {err}: {}", v["value"]["message"]);
        }
        v["value"].clone()
    }

    async fn try_cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value, String> {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = resp.json().await.map_err(|e| e.to_string())?;
        match v["value"].get("error") {
            Some(err) => Err(format!("{err}: {}", v["value"]["message"])),
            None => Ok(v["value"].clone()),
        }
    }

    pub async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url}))).await;
    }

    pub async fn current_url(&self) -> String {
        self.cmd(reqwest::Method::GET, "/url", None).await.as_str().unwrap_or_default().to_owned()
    }

    pub async fn title(&self) -> String {
        self.cmd(reqwest::Method::GET, "/title", None).await.as_str().unwrap_or_default().to_owned()
    }

    /// The page's HTML as the browser has it now.
    pub async fn source(&self) -> String {
        self.cmd(reqwest::Method::GET, "/source", None).await.as_str().unwrap_or_default().to_owned()
    }

    /// The first element matching a CSS selector, if any (no waiting).
    pub async fn find_now(&self, css: &str) -> Option<Element> {
        let v = self
            .try_cmd(reqwest::Method::POST, "/element", json!({"using": "css selector", "value": css}))
            .await
            .ok()?;
        v[ELEMENT].as_str().map(|s| Element(s.to_owned()))
    }

    /// Every element matching a CSS selector.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let v =
            self.cmd(reqwest::Method::POST, "/elements", Some(json!({"using": "css selector", "value": css}))).await;
        v.as_array()
            .map(|a| a.iter().filter_map(|e| e[ELEMENT].as_str().map(|s| Element(s.to_owned()))).collect())
            .unwrap_or_default()
    }

    /// Waits (up to `timeout`) for an element matching a CSS selector.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> Element {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(e) = self.find_now(css).await {
                return e;
            }
            if tokio::time::Instant::now() >= deadline {
                let url = self.current_url().await;
                let _ = self.screenshot("wait-for-failed").await;
                panic!("no element matches {css:?} at {url} after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Shorthand: the element, waiting up to 10 s.
    pub async fn find(&self, css: &str) -> Element {
        self.wait_for(css, Duration::from_secs(10)).await
    }

    pub async fn click(&self, e: &Element) {
        self.cmd(reqwest::Method::POST, &format!("/element/{}/click", e.0), Some(json!({}))).await;
    }

    /// Types into an input (after clearing it).
    pub async fn fill(&self, e: &Element, text: &str) {
        self.cmd(reqwest::Method::POST, &format!("/element/{}/clear", e.0), Some(json!({}))).await;
        self.cmd(reqwest::Method::POST, &format!("/element/{}/value", e.0), Some(json!({"text": text}))).await;
    }

    pub async fn text(&self, e: &Element) -> String {
        self.cmd(reqwest::Method::GET, &format!("/element/{}/text", e.0), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The text of the element `css` selects, found again when the page replaced it between the
    /// find and the read (a navigation that had not quite finished).
    pub async fn text_of(&self, css: &str) -> String {
        for _ in 0..50 {
            let e = self.find(css).await;
            let resp = self.http.get(format!("{}/element/{}/text", self.base, e.0)).send().await;
            let v: Value = resp.unwrap_or_else(|e| panic!("WebDriver text of {css}: {e}")).json().await.unwrap();
            match v["value"].get("error").and_then(Value::as_str) {
                None => return v["value"].as_str().unwrap_or_default().to_owned(),
                Some("stale element reference") => tokio::time::sleep(Duration::from_millis(100)).await,
                Some(err) => panic!("WebDriver text of {css}: {err}: {}", v["value"]["message"]),
            }
        }
        panic!("{css} kept being replaced");
    }

    pub async fn attribute(&self, e: &Element, name: &str) -> Option<String> {
        self.cmd(reqwest::Method::GET, &format!("/element/{}/attribute/{name}", e.0), None)
            .await
            .as_str()
            .map(str::to_owned)
    }

    /// Runs JavaScript in the page (`arguments` are passed through) and returns its result.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.cmd(reqwest::Method::POST, "/execute/sync", Some(json!({"script": script, "args": args}))).await
    }

    /// Cookies the browser holds for the current page.
    pub async fn cookies(&self) -> Vec<Value> {
        self.cmd(reqwest::Method::GET, "/cookie", None).await.as_array().cloned().unwrap_or_default()
    }

    /// Waits until `predicate(url)` holds for the current URL.
    pub async fn wait_for_url(&self, timeout: Duration, predicate: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let url = self.current_url().await;
            if predicate(&url) {
                return url;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("URL never matched; last was {url}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes a PNG screenshot under `target/screenshots/<name>.png` and returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine as _;
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default()).unwrap();
        let path = screenshot_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session stops Chromium; then the driver itself. A plain blocking request,
        // since drop may run outside the runtime.
        if let Some(rest) = self.base.strip_prefix("http://")
            && let Some((addr, path)) = rest.split_once('/')
            && let Ok(mut s) = std::net::TcpStream::connect(addr)
        {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ =
                write!(s, "DELETE /{path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = s.read_to_end(&mut Vec::new());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
