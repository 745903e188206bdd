/* omnigate chat widget: plain JavaScript, no build step, no eval, no inline script.
 *
 * <script src="https://GATEWAY/widget.js" data-site="SITE_KEY" async></script>
 *
 * Until the visitor opens the widget it only draws a launcher button: nothing
 * connects and nothing is written to cookies or storage. Model text is only
 * ever rendered with textContent.
 */
(() => {
  "use strict";

  // The host page's markup can shadow document properties by name (DOM clobbering:
  // <img name="currentScript" src="https://evil/widget.js" data-site="x">), so only a
  // real <script> element is believed, and the fallback lookup is not taken from
  // `document` either.
  const current = document.currentScript;
  const script =
    current instanceof HTMLScriptElement
      ? current
      : Document.prototype.querySelector.call(document, 'script[data-site][src*="/widget.js"]');
  if (!script || !script.dataset.site) return;
  const SITE = script.dataset.site;
  const BASE = new URL(script.src, location.href);
  const ORIGIN = BASE.origin;
  const WS_URL =
    (BASE.protocol === "https:" ? "wss://" : "ws://") + BASE.host +
    "/v1/widget/ws?site=" + encodeURIComponent(SITE);
  const CHAT_URL = ORIGIN + "/v1/widget/chat?site=" + encodeURIComponent(SITE);
  const STORE_KEY = "omnigate.session." + SITE;
  const registry = (window.__omnigate = window.__omnigate || {});
  if (registry[SITE]) return; // the snippet was pasted twice
  registry[SITE] = true;

  const WS_OPEN_FAILURES_BEFORE_FALLBACK = 2;
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const STORAGE_RETRIES = 3;

  const PURPOSES = {
    ai_processing: {
      label: "AI processing",
      help: "Your messages are sent, with personal details masked, to an AI model that writes the replies.",
    },
    conversation_storage: {
      label: "Keep this conversation",
      help: "The conversation is stored encrypted for {days} days so you can pick it up again.",
    },
    analytics: { label: "Analytics", help: "Usage statistics that help improve this service." },
    marketing: { label: "Marketing", help: "Use of the conversation for marketing purposes." },
    preferences: { label: "Preferences", help: "Remember your settings for this chat." },
  };

  // ---------- DOM helpers (never innerHTML) ----------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === false || v === null || v === undefined) continue;
      if (k === "text") el.textContent = v;
      else if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c) el.append(c);
    return el;
  }

  function show(el, on) {
    el.hidden = !on;
  }

  // ---------- storage: only after the widget was opened ----------

  let opened = false;

  function storageGet() {
    try {
      return window.sessionStorage.getItem(STORE_KEY);
    } catch (_) {
      return null; // storage disabled or sandboxed: memory only
    }
  }

  function storageSet(value) {
    if (!opened) return;
    try {
      if (value) window.sessionStorage.setItem(STORE_KEY, value);
      else window.sessionStorage.removeItem(STORE_KEY);
    } catch (_) {
      /* memory only */
    }
  }

  // ---------- UI ----------

  const host = h("div", { "data-omnigate": SITE });
  // hidden (via CSSOM, which CSP allows) until the stylesheet arrives
  host.style.display = "none";
  const root = host.attachShadow({ mode: "open" });
  const sheet = h("link", { rel: "stylesheet", href: ORIGIN + "/widget.css" });
  const reveal = () => {
    host.style.display = "";
  };
  sheet.addEventListener("load", reveal);
  sheet.addEventListener("error", reveal);

  const launcher = h("button", {
    type: "button",
    class: "launcher",
    "aria-expanded": "false",
    "aria-controls": "og-panel",
    "aria-label": "Open chat",
  });
  const SVG = "http://www.w3.org/2000/svg";
  const icon = document.createElementNS(SVG, "svg");
  icon.setAttribute("viewBox", "0 0 24 24");
  icon.setAttribute("aria-hidden", "true");
  icon.setAttribute("class", "launcher-icon");
  const bubblePath = document.createElementNS(SVG, "path");
  bubblePath.setAttribute("d", "M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2z");
  icon.append(bubblePath);
  const launcherText = h("span", { class: "launcher-text", text: "Chat" });
  launcher.append(icon, launcherText);

  const title = h("h2", { id: "og-title", text: "Chat with us" });
  const privacyBtn = h("button", {
    type: "button",
    class: "ghost",
    "aria-expanded": "false",
    "aria-controls": "og-privacy",
    text: "Privacy",
  });
  const closeBtn = h("button", { type: "button", class: "ghost close", "aria-label": "Close chat", text: "\u00D7" });
  const status = h("p", { class: "status", role: "status", "aria-live": "polite" });
  const retryNow = h("button", { type: "button", class: "link", text: "Retry now", hidden: true });
  const statusBar = h("div", { class: "status-bar", hidden: true }, status, retryNow);

  // consent
  const consentList = h("div", { class: "purposes" });
  const consentError = h("p", { class: "error-text", role: "alert" });
  const consentPolicyLink = h("p", { class: "policy-link" });
  const consentForm = h(
    "form",
    { class: "consent", id: "og-consent", "aria-labelledby": "og-consent-title", hidden: true, novalidate: true },
    h("h3", { id: "og-consent-title", text: "Before we chat" }),
    h("p", { text: "This chat needs your permission for the following. You can change your mind at any time under Privacy." }),
    consentList,
    consentPolicyLink,
    consentError,
    h(
      "div",
      { class: "actions" },
      h("button", { type: "submit", class: "primary", text: "Agree and start chatting" }),
      h("button", { type: "button", class: "secondary", text: "Not now", onclick: () => closePanel() }),
    ),
  );

  // conversation
  const log = h("ol", { class: "log", role: "log", "aria-live": "off", "aria-label": "Conversation" });
  const EMPTY_TEXT = "Ask us anything. Replies are written by an AI assistant.";
  const empty = h("p", { class: "empty", text: EMPTY_TEXT });
  const announcer = h("div", { class: "sr-only", "aria-live": "polite", "aria-atomic": "true" });
  const input = h("textarea", { id: "og-input", rows: "1", maxlength: "4000", placeholder: "Write a message\u2026", autocomplete: "off" });
  const sendBtn = h("button", { type: "submit", class: "primary send", text: "Send" });
  const composer = h(
    "form",
    { class: "composer" },
    h("label", { for: "og-input", class: "sr-only", text: "Message" }),
    input,
    sendBtn,
  );
  const chatView = h("div", { class: "chat" }, empty, log, composer);

  // privacy
  const privacyInfo = h("p", { class: "privacy-info" });
  const choiceList = h("div", { class: "purposes", role: "group", "aria-labelledby": "og-choices-title" });
  const choices = h(
    "div",
    { class: "choices", hidden: true },
    h("h4", { id: "og-choices-title", text: "Your choices" }),
    choiceList,
    h("p", { text: "A change applies from your next message on. To remove what is already stored, use Delete my data." }),
  );
  const privacyNote = h("p", { class: "note", role: "status" });
  const exportBtn = h("button", { type: "button", class: "secondary", text: "Download my data" });
  const deleteBtn = h("button", { type: "button", class: "danger", text: "Delete my data" });
  const policyLink = h("p", { class: "policy-link" });
  const confirmYes = h("button", { type: "button", class: "danger", text: "Delete everything" });
  const confirmNo = h("button", { type: "button", class: "secondary", text: "Cancel" });
  const confirmBox = h(
    "div",
    { class: "confirm", role: "alertdialog", "aria-labelledby": "og-confirm-title", "aria-describedby": "og-confirm-text", hidden: true },
    h("h4", { id: "og-confirm-title", text: "Delete your data?" }),
    h("p", { id: "og-confirm-text", text: "This erases this conversation and everything stored about you, right now. It cannot be undone." }),
    h("div", { class: "actions" }, confirmYes, confirmNo),
  );
  const privacyView = h(
    "section",
    { class: "privacy", id: "og-privacy", "aria-labelledby": "og-privacy-title", hidden: true },
    h("h3", { id: "og-privacy-title", text: "Your data" }),
    privacyInfo,
    choices,
    h("div", { class: "actions" }, exportBtn, deleteBtn),
    confirmBox,
    privacyNote,
    policyLink,
    h("button", { type: "button", class: "link", text: "Back to chat", onclick: () => togglePrivacy(false) }),
  );

  const panel = h(
    "section",
    { class: "panel", id: "og-panel", role: "dialog", "aria-modal": "false", "aria-labelledby": "og-title", hidden: true },
    h("header", {}, title, h("div", { class: "tools" }, privacyBtn, closeBtn)),
    statusBar,
    consentForm,
    privacyView,
    chatView,
    announcer,
  );
  root.append(sheet, launcher, panel);

  function mount() {
    document.body.append(host);
  }
  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount, { once: true });

  // ---------- state ----------

  let token = null; // the session token: memory, then sessionStorage once opened
  let policy = null;
  let needs = null; // purposes (and age_confirmation) still to grant, or null
  let ready = false; // welcome received and nothing left to consent to
  let transport = "ws"; // or "http" when no WebSocket could ever open
  let ws = null;
  let gen = 0; // connection generation: a message is sent at most once per connection
  let wsOpenFailures = 0;
  let everOpened = false; // a WebSocket opened on this page: the network allows them
  let attempt = 0;
  let reconnectTimer = null;
  let historyAsked = false;
  let pendingConsent = null; // fallback transport: consent rides on the next hello
  let httpBusy = false;
  let httpMsg = null; // the message the fallback is posting right now
  const msgs = new Map(); // client id -> message record, in send order
  const bySeq = new Map(); // seq -> rendered element (dedupe of history replays)
  let nextId = 0;

  function newId() {
    const rnd = new Uint32Array(2);
    crypto.getRandomValues(rnd);
    nextId += 1;
    return "c" + Date.now().toString(36) + rnd[0].toString(36) + rnd[1].toString(36) + nextId;
  }

  function setStatus(text, kind, canRetry) {
    status.textContent = text || "";
    statusBar.className = "status-bar" + (kind ? " " + kind : "");
    show(statusBar, Boolean(text));
    show(retryNow, Boolean(canRetry));
    panel.dataset.state = kind || (ready ? "ready" : "connecting");
  }

  // ---------- open / close ----------

  function openPanel() {
    show(panel, true);
    launcher.setAttribute("aria-expanded", "true");
    launcher.setAttribute("aria-label", "Close chat");
    launcherText.textContent = "Close";
    host.classList.add("open");
    if (!opened) {
      opened = true;
      token = token || storageGet();
      storageSet(token);
      connect();
    }
    focusFirst();
  }

  function closePanel() {
    show(panel, false);
    launcher.setAttribute("aria-expanded", "false");
    launcher.setAttribute("aria-label", "Open chat");
    launcherText.textContent = "Chat";
    host.classList.remove("open");
    launcher.focus();
  }

  function focusFirst() {
    if (!consentForm.hidden) {
      const first = consentForm.querySelector("input");
      (first || consentForm.querySelector("button")).focus();
    } else if (!privacyView.hidden) {
      exportBtn.focus();
    } else {
      input.focus();
    }
  }

  launcher.addEventListener("click", () => (panel.hidden ? openPanel() : closePanel()));
  closeBtn.addEventListener("click", closePanel);
  panel.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    e.preventDefault();
    if (!confirmBox.hidden) cancelDelete();
    else closePanel();
  });
  retryNow.addEventListener("click", () => {
    attempt = 0;
    for (const m of msgs.values()) m.waitUntil = 0;
    if (transport === "ws") reconnectSoon(0);
    else flush();
  });

  function togglePrivacy(on) {
    show(privacyView, on);
    show(chatView, !on && consentForm.hidden);
    privacyBtn.setAttribute("aria-expanded", String(on));
    privacyNote.textContent = "";
    if (on) renderPrivacy();
    focusFirst();
  }
  privacyBtn.addEventListener("click", () => togglePrivacy(privacyView.hidden));

  // ---------- messages ----------

  function bubble(role, text) {
    const body = h("p", { class: "text" });
    body.textContent = text;
    const who = h("span", { class: "sr-only", text: role === "user" ? "You: " : "Assistant: " });
    const li = h("li", { class: "msg " + role, "data-role": role }, who, body);
    empty.hidden = true;
    empty.textContent = EMPTY_TEXT;
    return li;
  }

  function placeBySeq(li, seq) {
    // before the first element with a larger seq or with none yet (still pending)
    for (const el of log.children) {
      const s = el.dataset.seq;
      if (s === undefined || Number(s) > seq) {
        log.insertBefore(li, el);
        return;
      }
    }
    log.append(li);
  }

  function claimSeq(seq, el) {
    if (typeof seq !== "number") return;
    const other = bySeq.get(seq);
    if (other && other !== el) other.remove(); // replayed from history: the live one wins
    bySeq.set(seq, el);
    el.dataset.seq = String(seq);
  }

  function sendText(text) {
    const msg = { id: newId(), text, sentOn: -1, status: "pending", reply: "", tries: 0 };
    msg.userEl = bubble("user", text);
    msg.userEl.classList.add("pending");
    log.append(msg.userEl);
    msgs.set(msg.id, msg);
    log.scrollTop = log.scrollHeight;
    flush();
  }

  function replyEl(msg) {
    if (!msg.replyEl) {
      msg.replyEl = bubble("assistant", "");
      msg.replyEl.classList.add("streaming");
      msg.userEl.after(msg.replyEl);
    }
    return msg.replyEl;
  }

  function unfinished() {
    return [...msgs.values()].filter((m) => m.status === "pending");
  }

  function flush() {
    if (!ready) return;
    if (transport === "http") {
      httpFlush();
      return;
    }
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    for (const msg of unfinished()) {
      if (msg.sentOn === gen || msg.waitUntil > Date.now()) continue;
      msg.sentOn = gen;
      msg.reply = ""; // a re-send streams the reply again from the start
      if (msg.replyEl) msg.replyEl.querySelector(".text").textContent = "";
      ws.send(JSON.stringify({ type: "message", id: msg.id, text: msg.text }));
    }
  }

  composer.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    sendText(text);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      composer.requestSubmit();
    }
  });

  // ---------- frames ----------

  function onFrame(f) {
    switch (f.type) {
      case "welcome":
        return onWelcome(f);
      case "consent_required":
        return askConsent(f.purposes || []);
      case "ack": {
        const msg = msgs.get(f.id);
        if (!msg) return;
        msg.userEl.classList.remove("pending", "failed");
        msg.userSeq = f.seq;
        claimSeq(f.seq, msg.userEl);
        return;
      }
      case "delta": {
        const msg = msgs.get(f.id);
        if (!msg) return;
        msg.reply += f.text;
        replyEl(msg).querySelector(".text").textContent = msg.reply;
        log.scrollTop = log.scrollHeight;
        return;
      }
      case "done": {
        const msg = msgs.get(f.id);
        if (!msg) return;
        msg.status = "done";
        const el = replyEl(msg);
        el.classList.remove("streaming");
        el.querySelector(".text").textContent = msg.reply;
        claimSeq(f.seq, el);
        dropInterrupted(msg.userSeq);
        // one announcement per completed reply, not one per delta
        announcer.textContent = "Assistant: " + msg.reply;
        if (statusBar.classList.contains("rate") || statusBar.classList.contains("storage")) setStatus("");
        return;
      }
      case "history":
        return onHistory(f.messages || []);
      case "error":
        return onError(f);
      default:
        return undefined;
    }
  }

  function onWelcome(f) {
    if (f.session_token && f.session_token !== token) {
      // the session our hello named is gone (expired, erased while the socket was
      // down): the gateway started a new one, or resumed another that the cookie
      // names (`resumed` is then true: another tab started it after an erasure).
      // Either way what is on screen belongs to the old one, and unanswered messages
      // must not be sent into the other.
      if (token) sessionReplaced();
      token = f.session_token;
      storageSet(token);
    }
    policy = f.policy || {};
    attempt = 0;
    renderPrivacyInfo(); // the view, open or not, tells what the gateway now holds
    choiceSaved();
    const granted = new Set(policy.granted || []);
    const missing = (policy.required_consents || []).filter((p) => !granted.has(p));
    // the gateway refuses every message until age is confirmed: text typed before
    // this welcome must wait for the box, not be sent ahead of it
    if (policy.age_confirmation && !policy.age_confirmed) missing.push("age_confirmation");
    if (missing.length) {
      askConsent(missing);
    } else {
      needs = null;
      ready = true;
      show(consentForm, false);
      show(chatView, privacyView.hidden);
      setStatus("");
    }
    if (transport === "ws" && f.resumed && !historyAsked && ws) {
      historyAsked = true;
      ws.send(JSON.stringify({ type: "history", limit: 50 }));
    }
    flush();
  }

  // "reply interrupted" notes by the seq of the message they answer; a later
  // complete reply to that message replaces the note
  const interrupted = new Map();

  function dropInterrupted(userSeq) {
    const note = interrupted.get(userSeq);
    if (note) {
      note.remove();
      interrupted.delete(userSeq);
    }
  }

  function onHistory(messages) {
    // replies that completed; an interrupted marker for one of them is not worth showing
    const answered = new Set(
      messages.filter((m) => m.role === "assistant" && m.status !== "interrupted").map((m) => m.reply_to)
    );
    for (const m of messages.slice().sort((a, b) => a.seq - b.seq)) {
      if (bySeq.has(m.seq) || (m.role !== "user" && m.role !== "assistant")) continue;
      if (m.status === "interrupted" && (answered.has(m.reply_to) || interrupted.has(m.reply_to))) continue;
      if (m.role === "assistant" && m.status !== "interrupted") dropInterrupted(m.reply_to);
      const text = m.status === "interrupted" ? "(This reply was interrupted.)" : m.text;
      const li = bubble(m.role, text);
      if (m.status === "interrupted") {
        li.classList.add("interrupted");
        interrupted.set(m.reply_to, li);
      }
      li.dataset.seq = String(m.seq);
      bySeq.set(m.seq, li);
      placeBySeq(li, m.seq);
    }
  }

  function onError(f) {
    const msg = f.id ? msgs.get(f.id) : null;
    const wait = typeof f.retry_after === "number" ? Math.max(1, Math.ceil(f.retry_after)) : null;
    switch (f.code) {
      case "rate_limited":
        if (!f.id && !policy && transport === "ws") {
          // the hello itself was refused (too many new sessions from here): no session
          // yet, so connect again once the wait is over
          setStatus("Too many new conversations from here. Trying again in " + (wait || 1) + " s.", "rate");
          retryHelloLater((wait || 1) * 1000);
          return;
        }
        if (f.reason === "busy") {
          // the same message is being answered in another tab of this conversation: not
          // the visitor's pace; its stored answer comes with the next try
          setStatus("This message is being answered in another tab. Checking again in " + (wait || 1) + " s.", "rate");
        } else {
          setStatus("You are sending messages too quickly. Trying again in " + (wait || 1) + " s.", "rate");
        }
        if (msg) retryLater(msg, (wait || 1) * 1000);
        return;
      case "consent_required":
        if (needs) {
          // the consent_required frame that came first opened the panel: the message
          // is re-sent once consent is given
          if (msg) msg.sentOn = -1;
          return;
        }
        // no consent is missing, so consent cannot cure it (processing is restricted at
        // the visitor's request): say so rather than wait, or re-post it, for ever
        failMessage(msg, f.message || "This message could not be sent.");
        // a refusal that raced a revocation made elsewhere: its consent_required frame
        // may still come, and then the message waits for consent like the others
        if (msg) msg.refusedConsent = true;
        return;
      case "storage_unavailable":
        if (msg && msg.tries < STORAGE_RETRIES) {
          msg.tries += 1;
          setStatus("Your message could not be saved yet. Retrying\u2026", "storage");
          retryLater(msg, (wait || 1) * 1000);
        } else {
          failMessage(msg, "Storage is unavailable right now. Your message was not sent.");
        }
        return;
      case "upstream_unavailable":
        failMessage(msg, "The assistant is unavailable right now. Please try again shortly.");
        return;
      case "upstream_timeout":
        failMessage(msg, "The assistant took too long to answer. Please try again.");
        return;
      case "upstream_rejected":
        failMessage(msg, "The assistant could not answer this message.");
        return;
      case "too_large":
        failMessage(msg, f.message || "This message is too long.");
        return;
      case "session_invalid":
        startFresh();
        return;
      default:
        failMessage(msg, f.message || "Something went wrong.");
    }
  }

  function retryLater(msg, ms) {
    msg.sentOn = -1;
    msg.waitUntil = Date.now() + ms;
    setTimeout(flush, ms + 50);
  }

  function failMessage(msg, text) {
    if (!msg) {
      setStatus(text, "error");
      return;
    }
    msg.status = "failed";
    msg.userEl.classList.remove("pending");
    msg.userEl.classList.add("failed");
    if (msg.replyEl) {
      msg.replyEl.remove();
      msg.replyEl = null;
    }
    const note = h("div", { class: "msg-error", role: "alert" });
    note.append(
      h("span", { text }),
      h("button", {
        type: "button",
        class: "link",
        text: "Retry",
        onclick: () => {
          unfail(msg);
          flush();
        },
      }),
    );
    msg.errorEl = note;
    msg.userEl.append(note);
  }

  // back to pending (sent again by the next flush), the same client id
  function unfail(msg) {
    if (msg.errorEl) msg.errorEl.remove();
    msg.errorEl = null;
    msg.refusedConsent = false;
    msg.status = "pending";
    msg.sentOn = -1;
    msg.tries = 0;
    msg.userEl.classList.remove("failed");
    msg.userEl.classList.add("pending");
  }

  // ---------- consent ----------

  function askConsent(purposes) {
    ready = false;
    // refused for consent before the panel opened (a revocation raced them): they are
    // sent once consent is given, as a message refused with the panel open is
    for (const m of msgs.values()) if (m.refusedConsent) unfail(m);
    // welcome and consent_required often name the same purposes: keep the form (and focus)
    if (!consentForm.hidden && needs && needs.join() === purposes.join()) return;
    const hadFocus = consentForm.contains(root.activeElement);
    needs = purposes.slice();
    consentList.textContent = "";
    consentError.textContent = "";
    const days = policy && policy.retention_days ? policy.retention_days : 90;
    const optional =
      policy && !needs.includes("conversation_storage") && !(policy.granted || []).includes("conversation_storage")
        ? ["conversation_storage"]
        : [];
    for (const p of [...needs, ...optional]) {
      const isOptional = optional.includes(p);
      const id = "og-c-" + p;
      let label;
      let help = "";
      if (p === "age_confirmation") {
        label = "I am at least " + ((policy && policy.min_age) || 16) + " years old";
      } else {
        const info = PURPOSES[p] || { label: p, help: "" };
        label = info.label + (isOptional ? " (optional)" : "");
        help = info.help.replace("{days}", String(days));
      }
      const box = h("input", {
        type: "checkbox",
        id,
        name: p,
        "data-optional": isOptional ? "true" : null,
        "aria-describedby": help ? id + "-help" : null,
      });
      consentList.append(
        h(
          "div",
          { class: "purpose" },
          box,
          h("label", { for: id, text: label }),
          help ? h("p", { id: id + "-help", class: "help", text: help }) : null,
        ),
      );
    }
    renderPolicyLink(consentPolicyLink);
    const wasHidden = consentForm.hidden;
    show(consentForm, true);
    show(chatView, false);
    show(privacyView, false);
    privacyBtn.setAttribute("aria-expanded", "false");
    setStatus("");
    if ((wasHidden || hadFocus) && !panel.hidden) focusFirst();
  }

  consentForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const boxes = [...consentList.querySelectorAll("input[type=checkbox]")];
    if (boxes.some((b) => !b.checked && !b.dataset.optional)) {
      consentError.textContent = "Please tick each box to chat, or choose Not now.";
      return;
    }
    const grant = boxes.filter((b) => b.checked && b.name !== "age_confirmation").map((b) => b.name);
    // an optional box left unticked is a "no": without it the gateway may keep what
    // its policy keeps by default (the transcript, when conversation_storage is in
    // neither required_consents nor optional_consents)
    const revoke = boxes.filter((b) => !b.checked && b.dataset.optional).map((b) => b.name);
    const age = boxes.some((b) => b.name === "age_confirmation");
    consentError.textContent = "";
    const frame = { type: "consent", grant };
    if (revoke.length) frame.revoke = revoke;
    if (age) frame.age_confirmed = true;
    if (transport === "ws" && ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify(frame)); // answered by a fresh welcome
    } else {
      // no socket (the fallback, or a socket that is down): it rides on the next hello
      pendingConsent = { grant, revoke, age };
      needs = null;
      ready = true;
      show(consentForm, false);
      show(chatView, true);
      flush();
    }
    input.focus();
  });

  // ---------- WebSocket transport ----------

  function signals() {
    const dnt = navigator.doNotTrack === "1" || window.doNotTrack === "1" || navigator.doNotTrack === "yes";
    return { gpc: navigator.globalPrivacyControl === true, dnt };
  }

  function helloFields() {
    const hello = { signals: signals() };
    if (token) hello.session_token = token;
    if (pendingConsent) {
      const { grant, revoke, age } = pendingConsent;
      hello.consent = Object.fromEntries([...grant.map((p) => [p, true]), ...revoke.map((p) => [p, false])]);
      if (age) hello.age_confirmed = true;
    }
    return hello;
  }

  // the consent a hello carried was applied (its welcome came, or the POST was taken)
  function consentDelivered(sent) {
    if (sent && pendingConsent === sent) pendingConsent = null;
  }

  function connect() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (transport === "http") {
      fallbackReady();
      return;
    }
    if (!navigator.onLine) {
      setStatus("You are offline. Messages will be sent when the connection is back.", "offline");
      return;
    }
    ready = false;
    historyAsked = false;
    gen += 1;
    const myGen = gen;
    let didOpen = false;
    setStatus(attempt ? "Reconnecting\u2026" : "Connecting\u2026", "connecting");
    const sock = new WebSocket(WS_URL);
    ws = sock;
    let helloConsent = null;
    sock.addEventListener("open", () => {
      if (myGen !== gen) return;
      didOpen = true;
      everOpened = true;
      wsOpenFailures = 0;
      helloConsent = pendingConsent;
      sock.send(JSON.stringify({ type: "hello", v: 1, ...helloFields() }));
    });
    sock.addEventListener("message", (e) => {
      if (myGen !== gen) return;
      let frame;
      try {
        frame = JSON.parse(e.data);
      } catch (_) {
        return;
      }
      if (frame.type === "welcome") consentDelivered(helloConsent);
      onFrame(frame);
    });
    sock.addEventListener("close", (e) => {
      if (myGen !== gen) return;
      ws = null;
      ready = false;
      if (e.code === 4001) {
        // the session was erased (here or in another tab): start afresh, never resume
        startFresh();
        return;
      }
      // sockets that never open mean a network that blocks them, unless one has opened
      // before: then the gateway is restarting, and the backoff below outlasts it
      if (!didOpen && !everOpened && navigator.onLine) {
        wsOpenFailures += 1;
        if (wsOpenFailures >= WS_OPEN_FAILURES_BEFORE_FALLBACK) {
          transport = "http";
          connect();
          return;
        }
      }
      if (!navigator.onLine) {
        setStatus("You are offline. Messages will be sent when the connection is back.", "offline");
        return;
      }
      reconnectSoon();
    });
  }

  function retryHelloLater(ms) {
    const old = ws;
    gen += 1; // ignore the old socket's close: this is not a lost connection
    ws = null;
    try {
      if (old) old.close(1000);
    } catch (_) {
      /* already closed */
    }
    clearTimeout(reconnectTimer);
    reconnectTimer = setTimeout(connect, ms);
  }

  function reconnectSoon(delay) {
    clearTimeout(reconnectTimer);
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt);
    const ms = delay === undefined ? base / 2 + Math.random() * (base / 2) : delay; // jittered
    attempt += 1;
    setStatus("Connection lost. Reconnecting in " + Math.ceil(ms / 1000) + " s\u2026", "reconnecting", true);
    reconnectTimer = setTimeout(connect, ms);
  }

  // forget the conversation on screen: messages, their seqs, interrupted notes, the
  // last announcement, and the Privacy view's account of the old session
  function clearConversation() {
    msgs.clear();
    bySeq.clear();
    interrupted.clear();
    log.textContent = "";
    empty.textContent = EMPTY_TEXT;
    empty.hidden = false;
    announcer.textContent = "";
    privacyInfo.textContent = "";
    privacyNote.textContent = "";
    offered.clear();
    choiceList.textContent = "";
    show(choices, false);
    choicePending = false;
  }

  function sessionReplaced() {
    // on the fallback the message being posted started the new session: it stays
    const keep = transport === "http" ? httpMsg : null;
    clearConversation();
    const note = "Your earlier conversation has ended. A new conversation has started.";
    empty.textContent = note;
    announcer.textContent = note;
    if (keep) {
      delete keep.userEl.dataset.seq;
      msgs.set(keep.id, keep);
      log.append(keep.userEl);
      if (keep.replyEl) keep.userEl.after(keep.replyEl);
      empty.hidden = true;
    }
  }

  function startFresh() {
    token = null;
    storageSet(null);
    policy = null;
    needs = null;
    ready = false;
    pendingConsent = null;
    clearConversation();
    if (ws) {
      gen += 1; // ignore the old socket's late events
      try {
        ws.close(1000);
      } catch (_) {
        /* already closed */
      }
      ws = null;
    }
    attempt = 0;
    connect();
  }

  window.addEventListener("offline", () => {
    if (!opened) return;
    setStatus("You are offline. Messages will be sent when the connection is back.", "offline");
  });
  window.addEventListener("online", () => {
    if (!opened) return;
    attempt = 0;
    if (transport === "http") {
      setStatus("");
      flush();
    } else if (!ws) {
      connect();
    } else if (ws.readyState === WebSocket.OPEN) {
      setStatus(""); // the socket survived the blip
      flush();
    }
  });

  // ---------- HTTP fallback: POST + text/event-stream read with fetch ----------

  function fallbackReady() {
    if (needs && needs.length) return;
    ready = true;
    show(chatView, privacyView.hidden && consentForm.hidden);
    setStatus("");
    panel.dataset.transport = "http";
    flush();
  }

  async function httpFlush() {
    if (httpBusy) return;
    httpBusy = true;
    try {
      for (;;) {
        const msg = unfinished().find((m) => m.sentOn !== gen && !(m.waitUntil > Date.now()));
        if (!msg || !ready) break;
        msg.sentOn = gen;
        msg.reply = "";
        if (msg.replyEl) msg.replyEl.querySelector(".text").textContent = "";
        httpMsg = msg;
        try {
          await postMessage(msg);
          attempt = 0;
          if (msg.status === "pending" && msg.sentOn === gen) {
            // the stream ended without done or error: try again later
            msg.sentOn = -1;
            throw new Error("stream ended early");
          }
        } catch (_) {
          msg.sentOn = -1;
          if (!navigator.onLine) {
            setStatus("You are offline. Messages will be sent when the connection is back.", "offline");
            break;
          }
          const base = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt);
          const ms = base / 2 + Math.random() * (base / 2);
          attempt += 1;
          msg.waitUntil = Date.now() + ms;
          setStatus("Connection lost. Retrying in " + Math.ceil(ms / 1000) + " s\u2026", "reconnecting", true);
          setTimeout(flush, ms + 50);
          break;
        }
      }
    } finally {
      httpBusy = false;
      httpMsg = null;
    }
  }

  async function postMessage(msg) {
    const sentConsent = pendingConsent;
    const hello = helloFields();
    const res = await fetch(CHAT_URL, {
      method: "POST",
      credentials: "include",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ type: "message", id: msg.id, text: msg.text, hello }),
    });
    if (!res.ok || !res.body) throw new Error("HTTP " + res.status);
    consentDelivered(sentConsent);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block
          .split("\n")
          .filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        let frame;
        try {
          frame = JSON.parse(data);
        } catch (_) {
          continue;
        }
        onFrame(frame);
      }
    }
  }

  // ---------- privacy controls ----------

  function renderPolicyLink(target) {
    target.textContent = "";
    const url = policy && policy.privacy_policy_url;
    if (url && /^https?:\/\//i.test(url)) {
      target.append(h("a", { href: url, target: "_blank", rel: "noopener noreferrer", text: "Privacy policy" }));
    }
  }

  function renderPrivacy() {
    renderPrivacyInfo();
    show(confirmBox, false);
  }

  function renderPrivacyInfo() {
    if (!policy) {
      privacyInfo.textContent = "";
      renderChoices();
      return;
    }
    const days = policy && policy.retention_days;
    const granted = (policy && policy.granted) || [];
    const parts = [];
    if (days) parts.push("Conversations are kept encrypted for " + days + " days, then anonymized.");
    parts.push(
      granted.length
        ? "You agreed to: " + granted.map((p) => (PURPOSES[p] ? PURPOSES[p].label : p)).join(", ") + "."
        : "You have not granted any optional purposes.",
    );
    if (policy && policy.tracking === "off") parts.push("Tracking is off.");
    privacyInfo.textContent = parts.join(" ");
    renderPolicyLink(policyLink);
    renderChoices();
  }

  // ---------- choices: optional purposes the visitor can withdraw or give again ----------

  const offered = new Set(); // optional purposes listed once stay listed (to turn back on)
  let choicePending = false; // a change was sent; its welcome is still to come

  function choicePurposes() {
    if (!policy) return [];
    const required = new Set(policy.required_consents || []);
    for (const p of policy.granted || []) if (PURPOSES[p]) offered.add(p);
    offered.add("conversation_storage"); // what the consent form offers as optional
    return Object.keys(PURPOSES).filter((p) => offered.has(p) && !required.has(p));
  }

  function choiceRow(p) {
    const id = "og-p-" + p;
    const info = PURPOSES[p];
    const days = (policy && policy.retention_days) || 90;
    const box = h("input", {
      type: "checkbox",
      id,
      name: p,
      "aria-describedby": id + "-help",
      onchange: (e) => changeChoice(p, e.target.checked),
    });
    return h(
      "div",
      { class: "purpose", "data-purpose": p },
      box,
      h("label", { for: id, text: info.label }),
      h("p", { id: id + "-help", class: "help", text: info.help.replace("{days}", String(days)) }),
    );
  }

  function renderChoices() {
    const purposes = choicePurposes();
    const granted = new Set((policy && policy.granted) || []);
    for (const row of [...choiceList.children]) {
      if (!purposes.includes(row.dataset.purpose)) row.remove();
    }
    for (const p of purposes) {
      let row = [...choiceList.children].find((r) => r.dataset.purpose === p);
      if (!row) {
        row = choiceRow(p);
        choiceList.append(row);
      }
      // as the gateway last said: the transcript may be kept by default, ungranted
      const on = granted.has(p) || (p === "conversation_storage" && policy && policy.storage === "on");
      row.querySelector("input").checked = on;
    }
    show(choices, purposes.length > 0);
  }

  function changeChoice(purpose, on) {
    const change = on ? { grant: [purpose] } : { revoke: [purpose] };
    if (transport === "http") {
      saveChoiceOverHttp(change);
      return;
    }
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      privacyNote.textContent = "Not connected right now. Please try again in a moment.";
      renderChoices();
      return;
    }
    choicePending = true;
    privacyNote.textContent = "Saving your choice\u2026";
    ws.send(JSON.stringify({ type: "consent", ...change })); // answered by a fresh welcome
  }

  function choiceSaved() {
    if (!choicePending) return;
    choicePending = false;
    privacyNote.textContent = "Your choice was saved.";
  }

  async function saveChoiceOverHttp(change) {
    // the fallback has no consent frame: the privacy API records it at once
    privacyNote.textContent = "Saving your choice\u2026";
    try {
      const res = await privacyFetch("/api/privacy/consent", "POST", change);
      if (!res.ok) throw new Error("HTTP " + res.status);
      const doc = await res.json();
      const purposes = doc.purposes || {};
      if (policy) {
        policy.granted = Object.keys(purposes).filter((p) => purposes[p] && purposes[p].granted);
        // a decision on keeping is recorded either way: it now says whether messages are kept
        const keeping = purposes.conversation_storage;
        if (keeping) policy.storage = keeping.granted ? "on" : "off";
      }
      renderPrivacyInfo();
      privacyNote.textContent = "Your choice was saved.";
    } catch (_) {
      renderChoices();
      privacyNote.textContent = "Your choice could not be saved. Please try again.";
    }
  }

  // the session behind the token expired, or was erased elsewhere: its data can no
  // longer be reached from here, so say so and start afresh rather than offer a retry
  function sessionEnded() {
    startFresh();
    const note = "This conversation has ended, so its data can no longer be reached " +
      "from here. A new, empty conversation has started.";
    privacyNote.textContent = note;
    announcer.textContent = note;
  }

  async function privacyFetch(path, method, body) {
    const headers = { Authorization: "Session " + token };
    if (body) headers["Content-Type"] = "application/json";
    return fetch(ORIGIN + path, {
      method,
      credentials: "include",
      headers,
      body: body ? JSON.stringify(body) : undefined,
    });
  }

  exportBtn.addEventListener("click", async () => {
    if (!token) {
      privacyNote.textContent = "There is no data about you yet.";
      return;
    }
    privacyNote.textContent = "Preparing your download\u2026";
    try {
      const res = await privacyFetch("/api/privacy/export", "GET");
      if (res.status === 404 || res.status === 405) {
        privacyNote.textContent = "Data export is not available on this site yet.";
        return;
      }
      if (res.status === 401) {
        sessionEnded();
        return;
      }
      if (!res.ok) throw new Error("HTTP " + res.status);
      // the gateway's JSON as it came, without a parse and re-serialisation
      const blob = new Blob([await res.arrayBuffer()], { type: "application/json" });
      const url = URL.createObjectURL(blob);
      const a = h("a", { href: url, download: "my-chat-data.json", hidden: true });
      root.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      privacyNote.textContent = "Your data was downloaded as my-chat-data.json.";
    } catch (_) {
      privacyNote.textContent = "The download failed. Please try again.";
    }
  });

  deleteBtn.addEventListener("click", () => {
    show(confirmBox, true);
    privacyNote.textContent = "";
    confirmNo.focus();
  });

  function cancelDelete() {
    show(confirmBox, false);
    deleteBtn.focus();
  }
  confirmNo.addEventListener("click", cancelDelete);

  confirmYes.addEventListener("click", async () => {
    show(confirmBox, false);
    if (!token) {
      privacyNote.textContent = "There is no data about you to delete.";
      return;
    }
    privacyNote.textContent = "Deleting\u2026";
    try {
      const res = await privacyFetch("/api/privacy/delete", "POST");
      if (res.status === 404 || res.status === 405) {
        privacyNote.textContent = "Deletion is not available on this site yet.";
        deleteBtn.focus();
        return;
      }
      if (res.status === 401) {
        sessionEnded();
        deleteBtn.focus();
        return;
      }
      if (!res.ok) throw new Error("HTTP " + res.status);
      startFresh();
      const done = "Your data was deleted. A new, empty conversation has started.";
      privacyNote.textContent = done;
      empty.textContent = done;
      announcer.textContent = done;
      deleteBtn.focus();
    } catch (_) {
      privacyNote.textContent = "Deletion failed. Please try again.";
      deleteBtn.focus();
    }
  });
})();
