// The scheduler's web UI. Every value from the server is put in the page as text
// (textContent, never innerHTML): outputs and errors are the application's data.
"use strict";

(function () {
  const KEY = "dispatch-aio-key";
  const REFRESH_MS = 1000;
  const PAGE = 50;

  const state = {
    pages: [""],      // the "before" token of each page shown so far; the last is current
    next: "",
    selected: "",     // dispatch id of the call shown in the detail panel
    busy: false,
    timer: 0,
    clockSkew: 0,     // server time minus browser time
  };

  const $ = (id) => document.getElementById(id);

  // el("td", {className: "x"}, "text", child...): strings become text nodes.
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (name === "dataset") Object.assign(node.dataset, value);
      else node[name] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // -- the key: from the address's fragment once, then from this tab's storage --------

  function readKeyFromAddress() {
    const params = new URLSearchParams(location.hash.slice(1));
    const key = params.get("key");
    if (key) {
      sessionStorage.setItem(KEY, key);
      params.delete("key");
      const rest = params.toString();
      // Take the key out of the address bar, the history and any copied link.
      history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
    }
    return sessionStorage.getItem(KEY) || "";
  }

  function showSignIn(message) {
    $("app").hidden = true;
    $("signout").hidden = true;
    $("signin").hidden = false;
    problem(message || "");
  }

  function problem(message) {
    $("problem").hidden = !message;
    $("problem").textContent = message;
  }

  class Unauthorized extends Error {}

  async function api(path) {
    const key = sessionStorage.getItem(KEY) || "";
    const response = await fetch(path, {
      headers: { Authorization: "Bearer " + key, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
    });
    if (response.status === 401) throw new Unauthorized("the API key was refused");
    let body;
    try {
      body = await response.json();
    } catch (err) {
      throw new Error("the scheduler answered HTTP " + response.status);
    }
    if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
    if (typeof body.now === "number") state.clockSkew = body.now - Date.now() / 1000;
    return body;
  }

  async function post(path, body) {
    const key = sessionStorage.getItem(KEY) || "";
    const response = await fetch(path, {
      method: "POST",
      headers: { Authorization: "Bearer " + key, "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body || {}),
      cache: "no-store",
      credentials: "omit",
    });
    if (response.status === 401) throw new Unauthorized("the API key was refused");
    let answer;
    try {
      answer = await response.json();
    } catch (err) {
      throw new Error("the scheduler answered HTTP " + response.status);
    }
    if (!response.ok) throw new Error(answer.error || "HTTP " + response.status);
    return answer;
  }

  // -- actions -----------------------------------------------------------------------

  // Cancelling takes two clicks: the first asks, the second (within 5 s) cancels.
  async function cancelClicked() {
    const button = $("cancel");
    const id = state.selected;
    if (button.dataset.armed !== id) {
      button.dataset.armed = id;
      button.textContent = "Click again to cancel";
      setTimeout(() => {
        if (button.dataset.armed === id) {
          delete button.dataset.armed;
          button.textContent = "Cancel call";
        }
      }, 5000);
      return;
    }
    delete button.dataset.armed;
    button.textContent = "Cancel call";
    button.disabled = true;
    try {
      const answer = await post("api/calls/" + encodeURIComponent(id) + "/cancel");
      $("d-action").textContent = answer.cancelled
        ? "cancelled (" + answer.stopped + " call" + (answer.stopped === 1 ? "" : "s") + " stopped)"
        : "it had finished already: nothing to cancel";
    } catch (err) {
      $("d-action").textContent = "not cancelled: " + err.message;
    } finally {
      button.disabled = false;
    }
    refresh();
  }

  async function sendEvent(event) {
    event.preventDefault();
    const key = $("ev-key").value.trim();
    const text = $("ev-value").value.trim();
    let value = null;
    if (text) {
      try {
        value = JSON.parse(text);
      } catch (err) {
        $("ev-result").textContent = "the value is not JSON (a text needs quotes: \"yes\")";
        return;
      }
    }
    $("ev-send").disabled = true;
    try {
      const answer = await post("api/events", { key: key, value: value });
      $("ev-result").textContent = "event " + JSON.stringify(key) + " resolved; " + answer.woken + " waiting call" + (answer.woken === 1 ? "" : "s") + " resumed";
      $("ev-key").value = "";
      $("ev-value").value = "";
    } catch (err) {
      $("ev-result").textContent = "not sent: " + err.message;
    } finally {
      $("ev-send").disabled = false;
    }
    refresh();
  }

  // -- formatting ------------------------------------------------------------------

  function now() {
    return Date.now() / 1000 + state.clockSkew;
  }

  function duration(seconds) {
    seconds = Math.max(seconds, 0);
    if (seconds < 1) return Math.round(seconds * 1000) + "ms";
    if (seconds < 60) return seconds.toFixed(2) + "s";
    if (seconds < 3600) return Math.floor(seconds / 60) + "m" + String(Math.floor(seconds % 60)).padStart(2, "0") + "s";
    const hours = Math.floor(seconds / 3600);
    if (hours < 48) return hours + "h" + String(Math.floor((seconds % 3600) / 60)).padStart(2, "0") + "m";
    return Math.floor(hours / 24) + "d" + String(hours % 24).padStart(2, "0") + "h";
  }

  function when(seconds) {
    const date = new Date(seconds * 1000);
    const today = new Date();
    const time = date.toLocaleTimeString([], { hour12: false });
    return date.toDateString() === today.toDateString() ? time : date.toLocaleDateString() + " " + time;
  }

  function elapsed(call) {
    return (call.finished !== null ? call.finished : now()) - call.created;
  }

  // The state shown: a finished call shows its status (ok, or the failure).
  function label(call) {
    if (call.state !== "done") return call.state;
    return call.status || "done";
  }

  function tone(call) {
    if (call.state !== "done") return call.state;
    return call.status === "ok" ? "ok" : "failed";
  }

  function badge(call) {
    return el("span", { className: "badge " + tone(call) }, label(call));
  }

  // Run requests that did not end in a poll: the first run, retries, tail calls.
  function attempts(call) {
    return Math.max(call.attempts - call.polls, call.attempts ? 1 : 0);
  }

  function outcome(call) {
    if (call.error) return [call.error.type, call.error.message].filter(Boolean).join(": ");
    if (call.output !== null && call.output !== undefined) return call.output;
    if (call.state !== "done" && call.last_error) return "last attempt: " + call.last_error;
    return "";
  }

  // -- the list of calls -------------------------------------------------------------

  function listQuery() {
    const params = new URLSearchParams();
    for (const box of document.querySelectorAll("#states input:checked")) params.append("state", box.value);
    if ($("status").value) params.set("status", $("status").value);
    if ($("function").value.trim()) params.set("function", $("function").value.trim());
    if ($("since").value) params.set("since", String(now() - Number($("since").value)));
    if ($("top").checked) params.set("top", "1");
    params.set("limit", String(PAGE));
    const before = state.pages[state.pages.length - 1];
    if (before) params.set("before", before);
    return "api/calls?" + params.toString();
  }

  function renderList(data) {
    const rows = data.calls.map((call) => {
      const row = el(
        "tr",
        { className: call.id === state.selected ? "selected" : "", dataset: { id: call.id, state: label(call) } },
        el("td", { className: "function" }, call.function),
        el("td", { className: "state" }, badge(call)),
        el("td", {}, attempts(call)),
        el("td", {}, call.child_count),
        el("td", {}, when(call.created)),
        el("td", {}, duration(elapsed(call))),
        el("td", { className: "result", title: outcome(call) }, outcome(call)),
        el("td", { className: "id" }, call.id),
      );
      row.addEventListener("click", () => select(call.id));
      return row;
    });
    $("calls").tBodies[0].replaceChildren(...rows);
    $("empty").hidden = rows.length > 0;
    state.next = data.next;
    $("older").disabled = !data.next;
    $("newest").disabled = state.pages.length === 1;
    $("pageinfo").textContent = "page " + state.pages.length;
  }

  // -- one call --------------------------------------------------------------------

  function select(id) {
    state.selected = id;
    $("d-action").textContent = "";
    history.replaceState(null, "", location.pathname + location.search + (id ? "#call=" + encodeURIComponent(id) : ""));
    for (const row of $("calls").tBodies[0].rows) row.classList.toggle("selected", row.dataset.id === id);
    $("detail").hidden = !id;
    $("app").classList.toggle("split", Boolean(id));
    if (id) refresh();
  }

  function callLink(id) {
    const link = el("a", { href: "#call=" + encodeURIComponent(id), className: "id" }, id);
    link.addEventListener("click", (event) => {
      event.preventDefault();
      select(id);
    });
    return link;
  }

  function renderDetail(data) {
    const call = data.call;
    $("d-function").textContent = call.function;
    $("d-state").replaceChildren(badge(call));
    $("cancel").hidden = call.state === "done";
    const facts = [
      ["ID", call.id],
      ["Parent", call.parent ? callLink(call.parent) : "none (top level)"],
      ["Root", call.root !== call.id ? callLink(call.root) : "this call"],
      ["Endpoint", call.endpoint],
      ["Attempts", attempts(call) + " run" + (attempts(call) === 1 ? "" : "s") + ", " + call.polls + " poll" + (call.polls === 1 ? "" : "s") + " (" + call.attempts + " requests)"],
      ["Created", when(call.created)],
      [call.finished !== null ? "Took" : "Running for", duration(elapsed(call))],
    ];
    if (call.version) facts.push(["Version", call.version]);
    if (call.policy) facts.push(["Policy", call.policy]);
    if (call.state !== "done") facts.push(["Expires in", duration(call.expires - now())]);
    if (call.failures) facts.push(["Failures in a row", call.failures]);
    if (call.divergences) facts.push(["Diverged from journal", call.divergences + " time" + (call.divergences === 1 ? "" : "s")]);
    if (call.last_error) facts.push(["Last attempt", call.last_error]);
    $("d-facts").replaceChildren(...facts.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
    $("d-input").textContent = call.input === null ? "(none)" : call.input;
    $("d-output-box").hidden = call.output === null;
    $("d-output").textContent = call.output === null ? "" : call.output;
    $("d-error-box").hidden = !call.error;
    if (call.error) {
      $("d-error").textContent = [call.error.type, call.error.message].filter(Boolean).join(": ");
      $("d-trace-box").hidden = !call.error.traceback;
      $("d-trace").textContent = call.error.traceback || "";
    }
    renderAttempts(call.attempts || []);
    renderTree(data.tree);
    renderTimeline(data.tree);
    renderJournal(call.journal);
  }

  // Each Run request of the call: a first run, a retry or a resume, and what came of it.
  function renderAttempts(list) {
    $("d-attempts-box").hidden = list.length === 0;
    const rows = list.map((a) =>
      el(
        "tr",
        { className: a.status === "ok" ? "" : "failed" },
        el("td", {}, a.number),
        el("td", {}, when(a.started)),
        el("td", {}, duration(a.finished - a.started)),
        el("td", {}, a.status),
        el("td", { className: "outcome" }, a.outcome),
      ),
    );
    $("d-attempts").tBodies[0].replaceChildren(...rows);
  }

  function renderTree(tree) {
    const item = (node) => {
      const head = el(
        "span",
        { className: "node" + (node.id === state.selected ? " selected" : ""), dataset: { id: node.id } },
        el("strong", {}, node.function),
        badge(node),
        el("span", { className: "muted" }, duration(elapsed(node))),
        el("span", { className: "summary" }, node.error ? outcome(node) : node.output !== null ? "-> " + node.output : node.input || ""),
      );
      head.addEventListener("click", () => select(node.id));
      const kids = node.children.map(item);
      if (node.hidden) kids.push(el("li", { className: "muted" }, "... " + node.hidden + " more"));
      return el("li", {}, head, kids.length ? el("ul", {}, ...kids) : null);
    };
    $("d-tree").replaceChildren(item(tree));
  }

  // A waterfall: one bar per call, from its creation to its end (or now), on the
  // scale of the whole tree.
  function renderTimeline(tree) {
    const flat = [];
    const walk = (node, depth) => {
      flat.push([node, depth]);
      for (const child of node.children) walk(child, depth + 1);
    };
    walk(tree, 0);
    const start = Math.min(...flat.map(([node]) => node.created));
    const end = Math.max(...flat.map(([node]) => (node.finished !== null ? node.finished : now())));
    const span = Math.max(end - start, 0.001);
    const rows = flat.slice(0, 500).map(([node, depth]) => {
      const stop = node.finished !== null ? node.finished : now();
      const bar = el("div", {
        className: "bar " + tone(node),
        title: node.function + ": " + duration(stop - node.created),
      });
      bar.style.left = ((100 * (node.created - start)) / span).toFixed(2) + "%";
      bar.style.width = ((100 * (stop - node.created)) / span).toFixed(2) + "%";
      const name = el("span", { className: "label", title: node.function }, "\u00a0".repeat(depth * 2) + node.function);
      const row = el("div", { className: "row" + (node.id === state.selected ? " selected" : ""), dataset: { id: node.id } }, name, el("div", { className: "track" }, bar), el("span", { className: "took" }, duration(stop - node.created)));
      row.addEventListener("click", () => select(node.id));
      return row;
    });
    $("d-timeline").replaceChildren(...rows);
  }

  function renderJournal(journal) {
    $("d-journal-box").hidden = false;
    const body = $("d-journal").tBodies[0];
    if (!journal) {
      $("d-journal-info").textContent = "No journal kept: the call is not suspended (a finished run's journal is dropped), or its endpoint keeps its own state.";
      $("d-journal").hidden = true;
      body.replaceChildren();
      return;
    }
    $("d-journal").hidden = journal.steps.length === 0;
    $("d-journal-info").textContent = journal.polls + " poll" + (journal.polls === 1 ? "" : "s") + " so far" + (journal.app_version ? ", app version " + journal.app_version : "");
    const rows = journal.steps.map((step) => el("tr", {}, el("td", {}, step.epoch), el("td", {}, step.what), el("td", { className: "id" }, step.where || "")));
    if (journal.hidden) rows.push(el("tr", {}, el("td", { colSpan: 3, className: "muted" }, "... " + journal.hidden + " more steps")));
    body.replaceChildren(...rows);
  }

  // -- refreshing ------------------------------------------------------------------

  function renderSchedules(data) {
    $("schedules-box").hidden = data.schedules.length === 0;
    const rows = data.schedules.map((s) => {
      const button = el("button", { type: "button" }, s.paused ? "Resume" : "Pause");
      button.addEventListener("click", () => toggleSchedule(s.id, s.paused ? "resume" : "pause", button));
      return el(
        "tr",
        { dataset: { id: s.id, paused: String(s.paused) } },
        el("td", { className: "id" }, s.id),
        el("td", {}, s.function + s.input),
        el("td", {}, s.timing),
        el("td", {}, s.paused ? "paused" : when(s.next)),
        el("td", {}, s.missed),
        el("td", {}, button),
      );
    });
    $("schedules").tBodies[0].replaceChildren(...rows);
  }

  async function toggleSchedule(id, action, button) {
    button.disabled = true;
    try {
      await post("api/schedules/" + encodeURIComponent(id) + "/" + action);
    } catch (err) {
      problem("The schedule was not changed: " + err.message);
    }
    refresh();
  }

  async function refresh() {
    if (state.busy) return;
    state.busy = true;
    try {
      const list = await api(listQuery());
      renderList(list);
      renderSchedules(await api("api/schedules"));
      if (state.selected) {
        const id = state.selected;
        try {
          const detail = await api("api/calls/" + encodeURIComponent(id));
          if (id === state.selected) renderDetail(detail);
        } catch (err) {
          if (err instanceof Unauthorized) throw err;
          $("d-function").textContent = String(err.message);
        }
      }
      $("updated").textContent = "updated " + new Date().toLocaleTimeString([], { hour12: false });
      problem("");
    } catch (err) {
      if (err instanceof Unauthorized) {
        sessionStorage.removeItem(KEY);
        showSignIn("The API key was refused: enter the scheduler's key.");
      } else {
        problem("Cannot reach the scheduler: " + err.message);
      }
    } finally {
      state.busy = false;
    }
  }

  function start() {
    $("signin").hidden = true;
    $("app").hidden = false;
    $("signout").hidden = false;
    refresh();
    if (!state.timer) {
      state.timer = setInterval(() => {
        if (!document.hidden && !$("app").hidden) refresh();
      }, REFRESH_MS);
    }
  }

  function filtersChanged() {
    state.pages = [""];
    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const key = readKeyFromAddress();
    const selected = new URLSearchParams(location.hash.slice(1)).get("call");
    if (selected) {
      state.selected = selected;
      $("detail").hidden = false;
      $("app").classList.add("split");
    }
    $("filters").addEventListener("change", filtersChanged);
    $("function").addEventListener("input", filtersChanged);
    $("filters").addEventListener("submit", (event) => event.preventDefault());
    $("older").addEventListener("click", () => {
      if (state.next) state.pages.push(state.next);
      refresh();
    });
    $("newest").addEventListener("click", () => {
      state.pages = [""];
      refresh();
    });
    $("close").addEventListener("click", () => select(""));
    $("cancel").addEventListener("click", cancelClicked);
    $("eventform").addEventListener("submit", sendEvent);
    $("signout").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      showSignIn("");
    });
    $("keyform").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY, $("keyinput").value.trim());
      $("keyinput").value = "";
      start();
    });
    if (key) start();
    else showSignIn("");
  });
})();
