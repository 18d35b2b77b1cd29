// Live staff alert banner: listens on /ws/alerts/ and keeps one line per firing alert.
(function () {
  "use strict";
  const banner = document.getElementById("staff-alerts");
  if (!banner) return;
  let delay = 1000;

  function render(alert) {
    let line = banner.querySelector(`[data-alert="${CSS.escape(alert.key)}"]`);
    if (alert.state === "resolved") {
      if (line) line.remove();
      return;
    }
    if (!line) {
      line = document.createElement("p");
      line.dataset.alert = alert.key;
      line.dataset.testid = "staff-alert";
      banner.appendChild(line);
    }
    line.className = `staff-alert staff-alert-${alert.level.toLowerCase()}`;
    line.replaceChildren();
    const level = document.createElement("strong");
    level.textContent = alert.level;
    const since = document.createElement("span");
    since.className = "staff-alert-since";
    since.textContent = `since ${alert.since.slice(0, 16).replace("T", " ")} UTC`;
    line.append(level, ` ${alert.key}: ${alert.summary}`, since);
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}${banner.dataset.socketPath}`);
    socket.onopen = () => {
      delay = 1000;
      banner.dataset.state = "connected";
    };
    socket.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === "alert") render(frame);
    };
    socket.onclose = (event) => {
      banner.dataset.state = "disconnected";
      if (event.code === 4403) return; // not staff (any more): stop
      // 1012: the web process restarts and another one is ready: at once. Otherwise back off, with
      // jitter, so that every open page does not come back in the same instant.
      if (event.code === 1012) {
        connect();
        return;
      }
      setTimeout(connect, delay / 2 + Math.random() * delay / 2);
      delay = Math.min(delay * 2, 30000);
    };
  }
  connect();
})();
