// The console's own script: progressive enhancement only. Every page works without it.
(function () {
  "use strict";

  // Times in the viewer's own time zone.
  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (t) {
      var d = new Date(t.getAttribute("datetime"));
      if (!isNaN(d.getTime())) {
        t.title = t.getAttribute("datetime");
        t.textContent = d.toLocaleString();
      }
    });
  }

  // A copy button next to a secret.
  function copyButtons(root) {
    root.querySelectorAll("[data-copy]").forEach(function (b) {
      var source = document.getElementById(b.getAttribute("data-copy"));
      if (!source || !navigator.clipboard) return;
      b.hidden = false;
      b.addEventListener("click", function () {
        navigator.clipboard.writeText(source.textContent.trim()).then(function () {
          b.textContent = "Copied";
        });
      });
    });
  }

  // Dangerous buttons ask first.
  function confirmations(root) {
    root.querySelectorAll("[data-confirm]").forEach(function (b) {
      b.addEventListener("click", function (e) {
        if (!window.confirm(b.getAttribute("data-confirm"))) e.preventDefault();
      });
    });
  }

  // Work that takes a while says so: the button of a form marked data-busy shows its text.
  function busyForms(root) {
    root.querySelectorAll("form[data-busy]").forEach(function (f) {
      f.addEventListener("submit", function () {
        var b = f.querySelector("button[type=submit]");
        if (!b) return;
        b.disabled = true;
        b.textContent = f.getAttribute("data-busy");
        f.setAttribute("aria-busy", "true");
      });
    });
  }

  function backButtons(root) {
    root.querySelectorAll("[data-back]").forEach(function (b) {
      if (history.length < 2) return;
      b.hidden = false;
      b.addEventListener("click", function () { history.back(); });
    });
  }

  // The city: the map/list toggle without a reload, and live presence.
  function city() {
    var city = document.getElementById("city");
    if (!city) return;
    var view = new URLSearchParams(location.search).get("view") === "list" ? "list" : "map";
    var state = document.getElementById("live-state");

    function applyView() {
      var map = document.getElementById("city-map");
      var list = document.getElementById("city-list");
      if (map) map.hidden = view !== "map";
      if (list) list.hidden = view !== "list";
      document.querySelectorAll("[data-view]").forEach(function (a) {
        if (a.getAttribute("data-view") === view) a.setAttribute("aria-current", "true");
        else a.removeAttribute("aria-current");
      });
    }
    document.querySelectorAll("[data-view]").forEach(function (a) {
      a.addEventListener("click", function (e) {
        e.preventDefault();
        view = a.getAttribute("data-view");
        history.replaceState(null, "", view === "list" ? "?view=list" : location.pathname);
        applyView();
      });
    });

    function setStatus(agentId, status) {
      var found = false;
      city.querySelectorAll('[data-agent-id="' + agentId + '"]').forEach(function (el) {
        found = true;
        if (el.classList.contains("status-text")) {
          el.textContent = status;
          return;
        }
        ["online", "busy", "idle", "offline"].forEach(function (s) { el.classList.remove("p-" + s); });
        el.classList.add("p-" + status);
        el.setAttribute("data-status", status);
        var title = el.querySelector("title");
        if (title) title.textContent = title.textContent.replace(/: [a-z]+$/, ": " + status);
      });
      return found;
    }

    // What the map shows is redrawn by the server; a burst of changes is one redraw.
    var pending = null;
    function redraw() {
      if (pending) return;
      pending = setTimeout(function () {
        pending = null;
        fetch(city.getAttribute("data-live"), { credentials: "same-origin", headers: { Accept: "text/html" } })
          .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
          .then(function (html) {
            city.innerHTML = html;
            applyView();
            localTimes(city);
            if (location.hash) {
              var open = document.getElementById(location.hash.slice(1));
              if (open) open.classList.add("open");
            }
          })
          .catch(function () {});
      }, 250);
    }

    if (!window.EventSource) return;
    var source = new EventSource(city.getAttribute("data-stream"), { withCredentials: true });
    source.addEventListener("open", function () {
      state.textContent = "Live";
      state.setAttribute("data-state", "live");
    });
    source.addEventListener("error", function () {
      state.textContent = "Reconnecting…";
      state.setAttribute("data-state", "reconnecting");
    });
    source.addEventListener("snapshot", function (e) {
      try {
        var snap = JSON.parse(e.data);
        var missing = false;
        var count = document.getElementById("online-count");
        if (count && typeof snap.online_count === "number") count.textContent = snap.online_count;
        (snap.agents || []).forEach(function (a) {
          if (!setStatus(a.id, a.status)) missing = true;
        });
        if (missing) redraw();
      } catch (err) { redraw(); }
    });
    source.addEventListener("presence", function (e) {
      try {
        var p = JSON.parse(e.data);
        if (!setStatus(p.agent_id, p.status)) redraw();
        var count = document.getElementById("online-count");
        if (count) count.textContent = city.querySelectorAll("#city-list span.dot:not(.p-offline)").length;
      } catch (err) { redraw(); }
    });
    source.addEventListener("moved", redraw);
    source.addEventListener("node", redraw);
  }

  function start() {
    localTimes(document);
    copyButtons(document);
    confirmations(document);
    backButtons(document);
    busyForms(document);
    city();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
