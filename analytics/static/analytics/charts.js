// Draws the analytics page's charts as inline SVG from the JSON the page embeds (no CDN, no library).
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var COLORS = ["#3b6fd8", "#d8513b", "#2e9e5b", "#a05ad8", "#d89a3b", "#3bb8d8", "#d83b8f", "#6b6b6b"];

  function data(id) {
    var node = document.getElementById(id);
    return node ? JSON.parse(node.textContent) : [];
  }

  function el(name, attrs, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceMax(value) {
    if (value <= 5) return 5;
    var step = Math.pow(10, Math.floor(Math.log10(value)));
    return Math.ceil(value / step) * step;
  }

  function lineChart(container, series) {
    if (!container || !series.length) return;
    var width = 900, height = 260, left = 44, right = 12, top = 12, bottom = 28;
    var points = series[0].points.length;
    var max = niceMax(Math.max.apply(null, series.map(function (s) { return Math.max.apply(null, s.points); })));
    var x = function (i) { return left + (i * (width - left - right)) / Math.max(points - 1, 1); };
    var y = function (v) { return top + (height - top - bottom) * (1 - v / max); };
    var svg = el("svg", { viewBox: "0 0 " + width + " " + height });
    for (var g = 0; g <= 4; g++) {
      var value = (max * g) / 4;
      svg.appendChild(el("line", { class: "grid", x1: left, x2: width - right, y1: y(value), y2: y(value) }));
      svg.appendChild(el("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end" }, String(Math.round(value))));
    }
    var start = new Date(series[0].start);
    for (var t = 0; t < points; t += 10) {
      var label = new Date(start.getTime() + t * 60000);
      var text = label.toTimeString().slice(0, 5);
      var anchor = t === 0 ? "start" : t + 10 >= points ? "end" : "middle";
      svg.appendChild(el("text", { x: x(t), y: height - 8, "text-anchor": anchor }, text));
    }
    svg.appendChild(el("line", { class: "axis", x1: left, x2: width - right, y1: y(0), y2: y(0) }));
    var legend = document.createElement("div");
    legend.className = "chart-legend";
    series.forEach(function (s, index) {
      var color = COLORS[index % COLORS.length];
      var path = s.points.map(function (v, i) { return (i ? "L" : "M") + x(i).toFixed(1) + " " + y(v).toFixed(1); });
      var line = el("path", { class: "line", d: path.join(" "), stroke: color });
      line.appendChild(el("title", {}, "#" + s.room));
      svg.appendChild(line);
      var key = document.createElement("span");
      key.style.setProperty("--swatch", color);
      key.textContent = "#" + s.room;
      legend.appendChild(key);
    });
    container.appendChild(svg);
    container.appendChild(legend);
  }

  function barChart(container, rows, labelOf) {
    if (!container || !rows.length) return;
    var width = 420, barHeight = 22, gap = 6, left = 150, right = 50;
    var height = rows.length * (barHeight + gap);
    var max = Math.max.apply(null, rows.map(function (r) { return r.count; })) || 1;
    var svg = el("svg", { viewBox: "0 0 " + width + " " + height });
    rows.forEach(function (row, i) {
      var yTop = i * (barHeight + gap);
      var w = ((width - left - right) * row.count) / max;
      var label = labelOf(row);
      if (label.length > 22) label = label.slice(0, 21) + "\u2026";
      svg.appendChild(el("text", { x: left - 6, y: yTop + barHeight * 0.7, "text-anchor": "end" }, label));
      svg.appendChild(el("rect", { class: "bar", x: left, y: yTop, width: Math.max(w, 1), height: barHeight, rx: 3 }));
      svg.appendChild(el("text", { x: left + w + 6, y: yTop + barHeight * 0.7 }, String(row.count)));
    });
    container.appendChild(svg);
  }

  lineChart(document.getElementById("minute-chart"), data("minute-series"));
  barChart(document.getElementById("rooms-chart"), data("busiest-rooms-data"), function (r) { return "#" + r.slug; });
  barChart(document.getElementById("users-chart"), data("top-users-data"), function (u) { return u.username; });
})();
