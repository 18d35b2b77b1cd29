/*
 * Mention notifications and VIP badges on the room page (docs/protocol.md, "Notifications").
 *
 * room.js calls two hooks on window.chatNotifications:
 * - decorateMessage(li, frame) for every stored message it shows: a VIP badge when
 *   frame.vip, and each @mention in the text highlighted (the reader's own name more so);
 * - receive(frame) for every {"type": "notification"} frame: a toast, an entry in the
 *   mentions list, and an unread count for the room it came from. room.js then acknowledges
 *   the frame over the socket (a `notification_ack`): shown, it needs no email.
 *
 * Notifications are kept in localStorage per user, so a count survives moving between
 * rooms; opening a room marks its notifications read. The server may push one twice
 * (at-least-once on redelivery): entries are de-duplicated by message id.
 * User text only ever reaches the DOM through textContent.
 */
(function () {
  "use strict";

  var config = JSON.parse(document.getElementById("chat-config").textContent);
  // The server's rule (chat/mentions.py): starts at a word boundary, ends with a letter or digit.
  var MENTION = /(^|[^\w@.+-])@([\w.@+-]*[A-Za-z0-9_])/g;
  var TOAST_MS = 8000;
  var KEEP = 50;
  var storageKey = "chat.notifications." + config.user;

  var entries = load();

  function load() {
    try {
      var stored = JSON.parse(localStorage.getItem(storageKey) || "[]");
      return Array.isArray(stored) ? stored : [];
    } catch (e) {
      return [];
    }
  }

  function save() {
    try {
      localStorage.setItem(storageKey, JSON.stringify(entries.slice(-KEEP)));
    } catch (e) {
      // Private mode or a full quota: counts then last as long as the page.
    }
  }

  // ---- messages: VIP badge and highlighted mentions -------------------------

  function decorateMessage(li, frame) {
    if (li.dataset.decorated === "1") return;
    li.dataset.decorated = "1";
    if (frame.vip) {
      var badge = document.createElement("span");
      badge.className = "badge vip-badge";
      badge.setAttribute("data-testid", "vip-badge");
      badge.title = "VIP";
      badge.textContent = "VIP";
      li.querySelector(".author").after(badge);
    }
    var text = li.querySelector(".text");
    if (text) highlightMentions(text, frame.text);
  }

  function highlightMentions(el, text) {
    var parts = [];
    var last = 0;
    var match;
    MENTION.lastIndex = 0;
    while ((match = MENTION.exec(text)) !== null) {
      var start = match.index + match[1].length;
      parts.push(document.createTextNode(text.slice(last, start)));
      var mark = document.createElement("mark");
      mark.className = "mention";
      mark.setAttribute("data-testid", "mention");
      if (match[2] === config.user) {
        mark.classList.add("mention-me");
        mark.setAttribute("data-testid", "mention-me");
      }
      mark.textContent = "@" + match[2];
      parts.push(mark);
      last = start + 1 + match[2].length;
    }
    if (!parts.length) return;
    parts.push(document.createTextNode(text.slice(last)));
    el.textContent = "";
    parts.forEach(function (part) { el.appendChild(part); });
    if (el.querySelector(".mention-me")) el.closest(".message").classList.add("mentions-me");
  }

  // ---- notifications: toast, list, unread counts ---------------------------

  var ui = buildPanel();

  function buildPanel() {
    var header = document.querySelector(".room-header");
    var panel = document.createElement("div");
    panel.className = "mentions";
    panel.setAttribute("data-testid", "mentions");
    var toggle = document.createElement("button");
    toggle.type = "button";
    toggle.className = "link-button mentions-toggle";
    toggle.setAttribute("data-testid", "mentions-toggle");
    toggle.setAttribute("aria-expanded", "false");
    var label = document.createElement("span");
    label.textContent = "Mentions ";
    var total = document.createElement("span");
    total.className = "unread-total";
    total.setAttribute("data-testid", "unread-total");
    toggle.appendChild(label);
    toggle.appendChild(total);

    var rooms = document.createElement("ul");
    rooms.className = "unread-rooms";
    rooms.setAttribute("data-testid", "unread-rooms");
    rooms.setAttribute("aria-label", "Unread mentions per room");

    var list = document.createElement("ol");
    list.className = "mention-list";
    list.setAttribute("data-testid", "mention-list");
    list.hidden = true;
    toggle.addEventListener("click", function () {
      list.hidden = !list.hidden;
      toggle.setAttribute("aria-expanded", String(!list.hidden));
    });

    panel.appendChild(toggle);
    panel.appendChild(rooms);
    panel.appendChild(list);
    header.appendChild(panel);

    var toasts = document.createElement("div");
    toasts.className = "toasts";
    toasts.setAttribute("role", "status");
    toasts.setAttribute("aria-live", "polite");
    document.body.appendChild(toasts);
    return { total: total, rooms: rooms, list: list, toasts: toasts };
  }

  function receive(frame) {
    if (frame.kind !== "mention") return;
    var seen = entries.some(function (entry) { return entry.message_id === frame.message_id; });
    if (seen) return;
    entries.push({
      message_id: frame.message_id,
      room: frame.room,
      from: frame.from,
      text: frame.text,
      at: new Date().toISOString(),
      // Mentions in the room on screen are seen as they arrive.
      read: frame.room === config.room
    });
    save();
    render();
    toast(frame);
  }

  function toast(frame) {
    var el = document.createElement("div");
    el.className = "toast";
    el.setAttribute("data-testid", "notification-toast");
    var title = document.createElement("strong");
    title.textContent = frame.from + " mentioned you in #" + frame.room;
    var body = document.createElement("div");
    body.className = "toast-text";
    body.textContent = frame.text;
    el.appendChild(title);
    el.appendChild(body);
    if (frame.room !== config.room) {
      el.classList.add("toast-link");
      el.addEventListener("click", function () { location.href = roomUrl(frame.room); });
    }
    ui.toasts.appendChild(el);
    setTimeout(function () { el.remove(); }, TOAST_MS);
  }

  function roomUrl(slug) {
    return "/rooms/" + encodeURIComponent(slug) + "/";
  }

  function render() {
    var unread = {};
    var total = 0;
    entries.forEach(function (entry) {
      if (entry.read) return;
      unread[entry.room] = (unread[entry.room] || 0) + 1;
      total += 1;
    });
    ui.total.textContent = total ? String(total) : "";
    ui.total.hidden = !total;

    ui.rooms.textContent = "";
    Object.keys(unread).sort().forEach(function (slug) {
      var li = document.createElement("li");
      li.setAttribute("data-testid", "unread-room");
      li.dataset.room = slug;
      var link = document.createElement("a");
      link.href = roomUrl(slug);
      link.textContent = "#" + slug;
      var count = document.createElement("span");
      count.className = "unread-count";
      count.setAttribute("data-testid", "unread-count");
      count.textContent = String(unread[slug]);
      li.appendChild(link);
      li.appendChild(count);
      ui.rooms.appendChild(li);
    });

    ui.list.textContent = "";
    entries.slice().reverse().forEach(function (entry) {
      var li = document.createElement("li");
      li.setAttribute("data-testid", "mention-entry");
      if (!entry.read) li.classList.add("unread");
      var link = document.createElement("a");
      link.href = roomUrl(entry.room);
      link.textContent = entry.from + " in #" + entry.room + ": " + entry.text;
      li.appendChild(link);
      ui.list.appendChild(li);
    });
  }

  function markRoomRead(slug) {
    var changed = false;
    entries.forEach(function (entry) {
      if (entry.room === slug && !entry.read) {
        entry.read = true;
        changed = true;
      }
    });
    if (changed) save();
  }

  markRoomRead(config.room);
  render();

  window.chatNotifications = { decorateMessage: decorateMessage, receive: receive };
})();
