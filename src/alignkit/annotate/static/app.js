// alignkit annotate: sign in with a token, label pairs. Model output is only ever set through
// textContent, so HTML or script in a response shows as text. The token goes in a header
// (never a cookie), which also keeps the posts CSRF-safe.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem("alignkit-token");
  let task = null;
  let choice = null;
  let key = null;
  let sending = false;

  function newKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function api(method, path, body) {
    const options = { method, headers: { Authorization: "Bearer " + token } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const reply = await fetch(path, options);
    const data = await reply.json().catch(() => ({}));
    if (!reply.ok) {
      const error = new Error(data.detail || reply.statusText);
      error.status = reply.status;
      throw error;
    }
    return data;
  }

  function show(section) {
    for (const id of ["signin", "work", "done"]) $(id).classList.toggle("hidden", id !== section);
  }

  function showProgress(p) {
    $("progress").textContent = `Done: ${p.done} · Waiting after this one: ${p.available}`;
  }

  function promptText(prompt) {
    if (typeof prompt === "string") return prompt;
    return prompt.map((m) => `${m.role}: ${m.content}`).join("\n\n");
  }

  function pick(side) {
    choice = side;
    for (const s of ["left", "right", "tie"]) $("pick-" + s).setAttribute("aria-pressed", String(s === side));
    $("left").classList.toggle("picked", side === "left");
    $("right").classList.toggle("picked", side === "right");
    $("submit").disabled = false;
  }

  async function next() {
    $("error").textContent = "";
    const data = await api("POST", "/api/next", {});
    showProgress(data.progress);
    task = data.task;
    if (!task) { show("done"); return; }
    choice = null;
    key = newKey();  // one key per assignment: a retried submit reuses it
    $("prompt").textContent = promptText(task.prompt);
    $("left").textContent = task.left;
    $("right").textContent = task.right;
    $("reason").value = "";
    $("confidence").value = "3";
    for (const input of document.querySelectorAll("#safety input")) input.checked = false;
    $("safety").classList.toggle("hidden", !task.ask_safety);
    for (const s of ["left", "right", "tie"]) $("pick-" + s).setAttribute("aria-pressed", "false");
    $("left").classList.remove("picked");
    $("right").classList.remove("picked");
    $("submit").disabled = true;
    $("work").dataset.assignment = String(task.assignment_id);
    show("work");
  }

  function radio(name) {
    const checked = document.querySelector(`#safety input[name="${name}"]:checked`);
    return checked ? checked.value : null;
  }

  async function send() {
    if (!task || !choice || sending) return;
    const body = { idempotency_key: key, choice, confidence: Number($("confidence").value), reason: $("reason").value };
    if (task.ask_safety) {
      const safer = radio("safer"), left = radio("left_safe"), right = radio("right_safe");
      if (!safer || !left || !right) { $("error").textContent = "Answer the safety questions too."; return; }
      Object.assign(body, { safer, left_safe: left === "true", right_safe: right === "true" });
    }
    sending = true;
    try {
      for (let attempt = 0; ; attempt++) {
        try {
          await api("POST", `/api/assignments/${task.assignment_id}/label`, body);
          break;
        } catch (err) {
          // network trouble or a busy server: retry with the same key (never a duplicate)
          if (attempt >= 4 || (err.status && err.status !== 429 && err.status < 500)) throw err;
          await new Promise((r) => setTimeout(r, 500 * (attempt + 1)));
        }
      }
      await next();
    } catch (err) {
      $("error").textContent = err.message;
    } finally {
      sending = false;
    }
  }

  async function signIn(value) {
    token = value.trim();
    try {
      const me = await api("GET", "/api/me");
      sessionStorage.setItem("alignkit-token", token);
      showProgress(me.progress);
      await next();
    } catch (err) {
      token = null;
      sessionStorage.removeItem("alignkit-token");
      show("signin");
      $("error").textContent = "Sign-in failed: " + err.message;
    }
  }

  $("signin-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("token").value); });
  $("signout").addEventListener("click", () => { sessionStorage.removeItem("alignkit-token"); token = null; show("signin"); });
  for (const s of ["left", "right", "tie"]) $("pick-" + s).addEventListener("click", () => pick(s));
  $("submit").addEventListener("click", send);
  document.addEventListener("keydown", (e) => {
    if ($("work").classList.contains("hidden")) return;
    const typing = e.target.tagName === "TEXTAREA" || (e.target.tagName === "INPUT" && e.target.type === "text");
    if (typing) return;
    const sides = { 1: "left", 2: "right", 3: "tie" };
    if (sides[e.key]) { e.preventDefault(); pick(sides[e.key]); }
    else if (e.key === "Enter") { e.preventDefault(); send(); }
  });
  if (token) signIn(token); else show("signin");
})();
