/*
 * The room page: history over /api/rooms/<slug>/messages, live messages over
 * /ws/rooms/<slug>/ (protocol: chat/protocol.py, docs/protocol.md).
 *
 * Guarantees the page keeps:
 * - every message is shown once (by id) and in seq order; a jump in seq is repaired
 *   from the API, because the server's live delivery is at-most-once;
 * - a message typed here stays "pending" until the server acknowledges its client_id,
 *   and pending messages are resent with the same client_id after a reconnect, which
 *   the server answers with the stored message instead of a duplicate;
 * - a restarting server's close (1012) is followed by a reconnect at once, any other
 *   by a jittered backoff, so that a thousand pages do not come back in one instant;
 * - user text only ever reaches the DOM through textContent.
 */
(function () {
  "use strict";

  var config = JSON.parse(document.getElementById("chat-config").textContent);
  var roomName = document.getElementById("room").dataset.roomName || config.room;

  var RECONNECT_BASE_MS = 500;
  var RECONNECT_MAX_MS = 20000;
  // Live frames of one room may overtake each other when written by different
  // processes; a short wait lets the missing one arrive before asking the API.
  var GAP_GRACE_MS = 300;
  var NEAR_TOP_PX = 120;
  var NEAR_BOTTOM_PX = 80;
  var FETCH_LIMIT = 100;

  // A web process that restarts closes its sockets with "service restart" (RFC 6455): another one
  // is ready behind the load balancer, so the page reconnects at once instead of backing off.
  var CLOSE_SERVICE_RESTART = 1012;
  var CLOSE_REASONS = {
    4401: "you are logged out. Log in again to keep chatting.",
    4403: "you do not have access to this room.",
    4404: "this room does not exist any more."
  };
  var ERROR_TEXT = {
    rate_limited: "You are sending messages a little too fast. Wait a moment, then retry.",
    too_long: "This message is too long to send.",
    invalid_message: "The server could not accept this message.",
    frame_too_large: "This message is too large to send.",
    invalid_json: "The server could not read this message.",
    unavailable: "The chat cannot store messages right now. Retry in a moment.",
    internal_error: "The server could not handle this message. Retry, or reload the page."
  };

  var els = {
    scroller: document.getElementById("message-scroller"),
    list: document.getElementById("message-list"),
    history: document.getElementById("history-state"),
    connection: document.getElementById("connection-state"),
    connectionText: document.querySelector("#connection-state .connection-text"),
    notice: document.getElementById("notice"),
    form: document.getElementById("composer"),
    input: document.getElementById("composer-input"),
    counter: document.getElementById("char-counter"),
    send: document.getElementById("send-button")
  };

  var state = {
    socket: null,
    attempts: 0,
    reconnectTimer: null,
    countdownTimer: null,
    closedForGood: false,
    historyLoaded: false,
    connecting: false,
    resyncing: false,
    bufferedFrames: [],
    // Newest message with nothing missing before it: the `since`/`after` cursor.
    lastId: 0,
    lastSeq: 0,
    maxSeq: 0,
    idBySeq: new Map(),
    elById: new Map(),
    pending: new Map(), // client_id -> {text, el}
    oldestId: null,
    hasOlder: false,
    loadingOlder: false,
    gapTimer: null,
    fillingGap: false
  };

  // ---- small helpers -------------------------------------------------------

  function uuid4() {
    // crypto.randomUUID exists only in secure contexts; plain-http deployments need this.
    var bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    var hex = Array.prototype.map.call(bytes, function (b) {
      return (b + 0x100).toString(16).slice(1);
    }).join("");
    return hex.slice(0, 8) + "-" + hex.slice(8, 12) + "-" + hex.slice(12, 16) + "-" +
      hex.slice(16, 20) + "-" + hex.slice(20);
  }

  function charCount(text) {
    // The server counts code points (Python len), not UTF-16 units.
    return Array.from(text).length;
  }

  function formatTime(date) {
    var now = new Date();
    var sameDay = date.toDateString() === now.toDateString();
    var options = sameDay
      ? { hour: "2-digit", minute: "2-digit" }
      : { day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" };
    if (!sameDay && date.getFullYear() !== now.getFullYear()) options.year = "numeric";
    return date.toLocaleString([], options);
  }

  function isNearBottom() {
    var s = els.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < NEAR_BOTTOM_PX;
  }

  function scrollToBottom() {
    els.scroller.scrollTop = els.scroller.scrollHeight;
  }

  var noticeTimer = null;
  function showNotice(text, sticky) {
    els.notice.textContent = text;
    els.notice.hidden = false;
    clearTimeout(noticeTimer);
    if (!sticky) {
      noticeTimer = setTimeout(function () { els.notice.hidden = true; }, 8000);
    }
  }

  // ---- connection state indicator -----------------------------------------

  function setConnection(name, text, link, action) {
    els.connection.dataset.state = name;
    els.connectionText.textContent = text;
    if (action) {
      var button = document.createElement("button");
      button.type = "button";
      button.className = "link-button";
      button.setAttribute("data-testid", "reconnect-now");
      button.textContent = action.text;
      button.addEventListener("click", action.run);
      els.connectionText.appendChild(document.createTextNode(" "));
      els.connectionText.appendChild(button);
    }
    if (link) {
      var a = document.createElement("a");
      a.href = link.href;
      a.textContent = link.text;
      els.connectionText.appendChild(document.createTextNode(" "));
      els.connectionText.appendChild(a);
    }
  }

  // ---- rendering messages --------------------------------------------------

  function buildMessage(options) {
    var li = document.createElement("li");
    li.className = "message";
    li.setAttribute("data-testid", "message");
    if (options.user === config.user) li.classList.add("own");

    var meta = document.createElement("div");
    meta.className = "meta";
    var author = document.createElement("span");
    author.className = "author";
    author.setAttribute("data-testid", "message-author");
    author.textContent = options.user;
    var time = document.createElement("time");
    time.setAttribute("data-testid", "message-time");
    var status = document.createElement("span");
    status.className = "status";
    status.setAttribute("data-testid", "message-status");
    meta.appendChild(author);
    meta.appendChild(time);
    meta.appendChild(status);

    var text = document.createElement("div");
    text.className = "text";
    text.setAttribute("data-testid", "message-text");
    text.textContent = options.text;

    li.appendChild(meta);
    li.appendChild(text);
    return li;
  }

  function setTime(li, iso) {
    var time = li.querySelector("time");
    var date = new Date(iso);
    time.dateTime = iso;
    time.textContent = formatTime(date);
    time.title = date.toLocaleString();
  }

  function markSent(li, frame) {
    li.dataset.id = String(frame.id);
    li.dataset.seq = String(frame.seq);
    li.dataset.state = "sent";
    li.dataset.clientId = frame.client_id;
    setTime(li, frame.created_at);
    li.querySelector(".status").textContent = "";
    var error = li.querySelector(".message-error");
    if (error) error.remove();
    // VIP badge and highlighted @mentions (chat/static/chat/notifications.js).
    if (window.chatNotifications) window.chatNotifications.decorateMessage(li, frame);
  }

  function markPending(li) {
    li.dataset.state = "pending";
    li.querySelector(".status").textContent = "sending…";
    var error = li.querySelector(".message-error");
    if (error) error.remove();
  }

  function markFailed(li, clientId, text) {
    li.dataset.state = "failed";
    li.querySelector(".status").textContent = "not sent";
    var error = li.querySelector(".message-error");
    if (error) error.remove();
    error = document.createElement("div");
    error.className = "message-error";
    error.setAttribute("role", "alert");
    var reason = document.createElement("span");
    reason.setAttribute("data-testid", "message-error");
    reason.textContent = text;
    var retry = document.createElement("button");
    retry.type = "button";
    retry.className = "link-button";
    retry.setAttribute("data-testid", "message-retry");
    retry.textContent = "Retry";
    retry.addEventListener("click", function () { retryPending(clientId); });
    var discard = document.createElement("button");
    discard.type = "button";
    discard.className = "link-button";
    discard.setAttribute("data-testid", "message-discard");
    discard.textContent = "Discard";
    discard.addEventListener("click", function () { discardPending(clientId); });
    error.appendChild(reason);
    error.appendChild(retry);
    error.appendChild(discard);
    li.appendChild(error);
  }

  /* Put a stored message where its seq belongs: after every stored message with a
   * smaller seq and before any unacknowledged ones, which stay at the bottom. */
  function placeSent(li, seq) {
    var child = els.list.lastElementChild;
    while (child) {
      if (child !== li && child.dataset.state === "sent" && Number(child.dataset.seq) < seq) {
        if (child.nextElementSibling !== li) child.after(li);
        return;
      }
      child = child.previousElementSibling;
    }
    if (els.list.firstElementChild !== li) els.list.prepend(li);
  }

  function recordSeq(frame) {
    state.idBySeq.set(frame.seq, frame.id);
    if (frame.seq > state.maxSeq) state.maxSeq = frame.seq;
    while (state.idBySeq.has(state.lastSeq + 1)) {
      state.lastSeq += 1;
      state.lastId = state.idBySeq.get(state.lastSeq);
    }
    if (state.oldestId === null || frame.id < state.oldestId) state.oldestId = frame.id;
  }

  /* Show one stored message, from any source (ack, live, replay, history), once. */
  function receiveMessage(frame) {
    var pending = frame.user === config.user ? state.pending.get(frame.client_id) : null;
    var existing = state.elById.get(frame.id);
    if (pending) {
      state.pending.delete(frame.client_id);
      if (existing) {
        pending.el.remove();
      } else {
        markSent(pending.el, frame);
        placeSent(pending.el, frame.seq);
        state.elById.set(frame.id, pending.el);
      }
    } else if (!existing) {
      var li = buildMessage({ user: frame.user, text: frame.text });
      markSent(li, frame);
      placeSent(li, frame.seq);
      state.elById.set(frame.id, li);
    }
    recordSeq(frame);
  }

  function receiveLive(frame) {
    var follow = isNearBottom() || frame.user === config.user;
    receiveMessage(frame);
    if (follow) scrollToBottom();
    if (state.maxSeq > state.lastSeq) scheduleGapFill();
  }

  // ---- history over the API -------------------------------------------------

  function apiUrl(params) {
    var query = new URLSearchParams(params).toString();
    return "/api/rooms/" + encodeURIComponent(config.room) + "/messages?" + query;
  }

  function fetchPage(params) {
    return fetch(apiUrl(params), {
      credentials: "same-origin",
      headers: { Accept: "application/json" }
    }).then(function (response) {
      if (response.status === 401) return stopForGood(4401);
      if (response.status === 404) return stopForGood(4404);
      if (!response.ok) throw new Error("history request failed: " + response.status);
      return response.json();
    });
  }

  function setHistoryState(name, text) {
    els.history.dataset.state = name;
    els.history.textContent = text;
  }

  function loadLatest() {
    setHistoryState("loading", "Loading messages…");
    return fetchPage({ limit: config.pageSize }).then(function (page) {
      if (!page) return false;
      if (page.messages.length && state.lastSeq === 0) {
        // Nothing before the newest page is needed to be up to date: count from its start.
        state.lastSeq = page.messages[0].seq - 1;
      }
      page.messages.forEach(receiveMessage);
      state.hasOlder = page.has_more;
      state.historyLoaded = true;
      showHistoryEdge();
      scrollToBottom();
      fillViewport();
      return true;
    });
  }

  function showHistoryEdge() {
    if (state.hasOlder) {
      setHistoryState("idle", "");
    } else {
      setHistoryState("done", "This is the beginning of #" + roomName + ".");
    }
  }

  function loadOlder() {
    if (state.loadingOlder || !state.hasOlder || state.oldestId === null) return;
    state.loadingOlder = true;
    setHistoryState("loading", "Loading older messages…");
    fetchPage({ before: state.oldestId, limit: config.pageSize }).then(function (page) {
      state.loadingOlder = false;
      if (!page) return;
      // Keep what the reader is looking at in place while rows appear above it.
      var fromBottom = els.scroller.scrollHeight - els.scroller.scrollTop;
      page.messages.forEach(receiveMessage);
      els.scroller.scrollTop = els.scroller.scrollHeight - fromBottom;
      state.hasOlder = page.has_more;
      showHistoryEdge();
      fillViewport();
    }).catch(function () {
      state.loadingOlder = false;
      setHistoryState("error", "Could not load older messages; scroll up to try again.");
    });
  }

  function fillViewport() {
    // Without a scrollbar there is no scroll to the top to ask for more.
    if (state.hasOlder && els.scroller.scrollHeight <= els.scroller.clientHeight) loadOlder();
  }

  function scheduleGapFill() {
    if (state.gapTimer !== null) return;
    state.gapTimer = setTimeout(function () {
      state.gapTimer = null;
      fillGap();
    }, GAP_GRACE_MS);
  }

  /* Fetch everything after the last message with no gap before it, until caught up. */
  function fillGap() {
    if (state.fillingGap || state.maxSeq <= state.lastSeq) return;
    state.fillingGap = true;
    var follow = isNearBottom();
    var cursor = state.lastId;
    fetchPage({ after: cursor, limit: FETCH_LIMIT }).then(function (page) {
      state.fillingGap = false;
      if (!page) return;
      page.messages.forEach(receiveMessage);
      if (follow) scrollToBottom();
      // Go on while the page was full and made progress; a stuck cursor waits for the next frame.
      if (page.has_more && state.lastId !== cursor) fillGap();
    }).catch(function () {
      state.fillingGap = false;
      scheduleGapFill();
    });
  }

  /* The server skipped a replay because too much was missed: start over from the newest page. */
  function resync() {
    state.resyncing = true;
    state.elById.forEach(function (li) { li.remove(); });
    state.elById = new Map();
    state.idBySeq = new Map();
    state.lastId = 0;
    state.lastSeq = 0;
    state.maxSeq = 0;
    state.oldestId = null;
    loadLatest().then(function () {
      state.resyncing = false;
      var frames = state.bufferedFrames;
      state.bufferedFrames = [];
      frames.forEach(receiveLive);
    }).catch(function () {
      state.resyncing = false;
      state.bufferedFrames = [];
      // A fresh socket asks for everything since the (now empty) cursor and resyncs again.
      if (state.socket) state.socket.close();
    });
  }

  // ---- the socket ----------------------------------------------------------

  function socketUrl() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    return scheme + location.host + "/ws/rooms/" + encodeURIComponent(config.room) +
      "/?since=" + state.lastId;
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    clearInterval(state.countdownTimer);
    state.reconnectTimer = null;
    if (state.closedForGood) return;
    if (state.attempts > 0) setConnection("reconnecting", "Reconnecting…");
    if (!state.historyLoaded) {
      // The socket's `since` cursor comes from the history, so history first.
      state.connecting = true;
      loadLatest().then(function (loaded) {
        state.connecting = false;
        if (loaded) openSocket();
      }).catch(function () {
        state.connecting = false;
        setHistoryState("error", "Could not load messages.");
        scheduleReconnect();
      });
      return;
    }
    openSocket();
  }

  function openSocket() {
    var socket = new WebSocket(socketUrl());
    state.socket = socket;
    socket.addEventListener("open", function () {
      if (socket !== state.socket) return;
      setConnection("connected", "Connected");
      state.pending.forEach(function (entry, clientId) {
        if (entry.el.dataset.state === "pending") transmit(clientId);
      });
    });
    socket.addEventListener("message", function (event) {
      if (socket !== state.socket) return;
      var frame;
      try {
        frame = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      handleFrame(frame);
    });
    socket.addEventListener("close", function (event) {
      if (socket !== state.socket) return;
      state.socket = null;
      if (CLOSE_REASONS[event.code]) {
        stopForGood(event.code);
      } else if (event.code === CLOSE_SERVICE_RESTART) {
        // No failure to count or wait out; were the next try to fail, the backoff takes over.
        setConnection("reconnecting", "Reconnecting…");
        connect();
      } else {
        scheduleReconnect();
      }
    });
  }

  function handleFrame(frame) {
    switch (frame.type) {
      case "message":
        // Another room's frame would corrupt this room's seq bookkeeping; a channel layer
        // shared by several deployments (or test runs) can deliver one.
        if (frame.room !== config.room) break;
        if (state.resyncing) {
          state.bufferedFrames.push(frame);
        } else {
          receiveLive(frame);
        }
        break;
      case "synced":
        // The server proved healthy end to end: the next outage starts from short waits.
        state.attempts = 0;
        if (state.maxSeq > state.lastSeq) scheduleGapFill();
        break;
      case "resync":
        state.attempts = 0;
        resync();
        break;
      case "error":
        handleError(frame);
        break;
      case "notification":
        if (window.chatNotifications) {
          window.chatNotifications.receive(frame);
        } else {
          showNotice(frame.text || frame.detail || "Notification");
        }
        // Shown: only now does the server count it delivered; unacknowledged, it is emailed.
        acknowledgeNotification(frame.id);
        break;
      default:
        break;
    }
  }

  function acknowledgeNotification(id) {
    var socket = state.socket;
    if (!id || !socket || socket.readyState !== WebSocket.OPEN) return;
    socket.send(JSON.stringify({ type: "notification_ack", id: id }));
  }

  function handleError(frame) {
    var text = ERROR_TEXT[frame.code] || "Something went wrong.";
    if (frame.code === "too_long" && frame.detail) text = frame.detail;
    var entry = frame.client_id ? state.pending.get(frame.client_id) : null;
    if (entry) {
      markFailed(entry.el, frame.client_id, text);
    } else {
      showNotice(text + (frame.detail && text !== frame.detail ? " (" + frame.detail + ")" : ""));
    }
  }

  function scheduleReconnect() {
    if (state.closedForGood) return;
    if (!navigator.onLine) {
      setConnection("offline", "Offline: no network. Reconnecting when it is back.");
      return;
    }
    // Exponential backoff with jitter, so a restarted server is not hit by every tab at once.
    var ceiling = Math.min(RECONNECT_MAX_MS, RECONNECT_BASE_MS * Math.pow(2, state.attempts));
    var delay = ceiling / 2 + Math.random() * ceiling / 2;
    state.attempts += 1;
    var due = Date.now() + delay;
    var tick = function () {
      var seconds = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      var action = seconds > 2 ? { text: "Retry now", run: reconnectNow } : null;
      setConnection("reconnecting", "Reconnecting in " + seconds + "s…", null, action);
    };
    tick();
    clearInterval(state.countdownTimer);
    state.countdownTimer = setInterval(tick, 1000);
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (state.closedForGood || state.socket || state.connecting) return;
    state.attempts = 0;
    connect();
  }

  function stopForGood(code) {
    state.closedForGood = true;
    clearTimeout(state.reconnectTimer);
    clearInterval(state.countdownTimer);
    if (state.socket) {
      var socket = state.socket;
      state.socket = null;
      socket.close();
    }
    var link = code === 4401 ? { href: "/accounts/login/?next=" + encodeURIComponent(location.pathname), text: "Log in" } : null;
    setConnection("offline", "Offline: " + CLOSE_REASONS[code], link);
    els.connection.dataset.closeCode = String(code);
    els.input.disabled = true;
    updateComposer();
    return null;
  }

  // ---- sending --------------------------------------------------------------

  function transmit(clientId) {
    var entry = state.pending.get(clientId);
    var socket = state.socket;
    if (!entry || !socket || socket.readyState !== WebSocket.OPEN) return;
    socket.send(JSON.stringify({ type: "message", text: entry.text, client_id: clientId }));
  }

  function submit() {
    var text = els.input.value;
    if (!text.trim() || charCount(text) > config.maxChars || els.input.disabled) return;
    var clientId = uuid4();
    var li = buildMessage({ user: config.user, text: text });
    li.dataset.clientId = clientId;
    setTime(li, new Date().toISOString());
    markPending(li);
    els.list.appendChild(li);
    state.pending.set(clientId, { text: text, el: li });
    els.input.value = "";
    updateComposer();
    scrollToBottom();
    // Unconnected: it stays pending and goes out when the socket opens.
    transmit(clientId);
  }

  function retryPending(clientId) {
    var entry = state.pending.get(clientId);
    if (!entry) return;
    markPending(entry.el);
    transmit(clientId);
  }

  function discardPending(clientId) {
    var entry = state.pending.get(clientId);
    if (!entry) return;
    state.pending.delete(clientId);
    entry.el.remove();
  }

  function fitComposer() {
    // Grow with the text up to the CSS max-height, then scroll inside.
    els.input.style.height = "auto";
    els.input.style.height = els.input.scrollHeight + 2 + "px";
  }

  function updateComposer() {
    fitComposer();
    var count = charCount(els.input.value);
    els.counter.textContent = count + " / " + config.maxChars;
    els.counter.classList.toggle("over", count > config.maxChars);
    els.counter.classList.toggle("near", count <= config.maxChars && count > config.maxChars * 0.9);
    els.send.disabled = els.input.disabled || !els.input.value.trim() || count > config.maxChars;
  }

  // ---- wiring ---------------------------------------------------------------

  els.form.addEventListener("submit", function (event) {
    event.preventDefault();
    submit();
  });
  els.input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
  els.input.addEventListener("input", updateComposer);
  els.scroller.addEventListener("scroll", function () {
    if (els.scroller.scrollTop < NEAR_TOP_PX) loadOlder();
  }, { passive: true });
  window.addEventListener("online", reconnectNow);
  document.addEventListener("visibilitychange", function () {
    // A tab coming back after a long backoff should not wait out the rest of it.
    if (document.visibilityState === "visible" && state.reconnectTimer !== null) reconnectNow();
  });
  window.addEventListener("offline", function () {
    if (!state.socket && !state.closedForGood) {
      setConnection("offline", "Offline: no network. Reconnecting when it is back.");
    }
  });

  updateComposer();
  setConnection("connecting", "Connecting…");
  connect();
  els.input.focus();
})();
