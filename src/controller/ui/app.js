// Live updates of the overview: the appliance pushes the whole view as
// server-sent events (GET /api/events, with the page's viewer cookie);
// rows are rebuilt with textContent only, never innerHTML.
"use strict";
(function () {
  function cell(tr, text) {
    var td = document.createElement("td");
    if (text instanceof Node) { td.appendChild(text); } else { td.textContent = text; }
    tr.appendChild(td);
    return td;
  }
  function bar(pct, label) {
    var span = document.createElement("span");
    var p = document.createElement("progress");
    p.max = 100; p.value = pct;
    span.appendChild(p);
    span.appendChild(document.createTextNode(" " + label));
    return span;
  }
  function fill(id, rows, empty, build) {
    var tbody = document.querySelector("#" + id + " tbody");
    var fresh = document.createElement("tbody");
    rows.forEach(function (r) { fresh.appendChild(build(r)); });
    if (rows.length === 0) {
      var tr = document.createElement("tr"); tr.className = "none";
      var td = cell(tr, empty); td.colSpan = 8; fresh.appendChild(tr);
    }
    tbody.parentNode.replaceChild(fresh, tbody);
  }
  function render(v) {
    fill("waves", v.waves, "no wave running", function (w) {
      var tr = document.createElement("tr");
      tr.dataset.wave = w.id;
      cell(tr, String(w.id)); cell(tr, w.image);
      cell(tr, w.verified + " / " + w.members); cell(tr, String(w.failed));
      var pct = Math.round(w.progress * 1000) / 10;
      cell(tr, bar(pct, pct + "%"));
      cell(tr, Math.round(w.rate_bps / 1e6) + " Mbit/s");
      cell(tr, w.eta_s === null ? "-" : Math.round(w.eta_s) + "s");
      cell(tr, w.behind.join(", "));
      return tr;
    });
    var counts = {};
    v.devices.forEach(function (d) { counts[d.state] = (counts[d.state] || 0) + 1; });
    document.getElementById("counts").textContent = Object.keys(counts).sort().map(function (k) { return k + " " + counts[k]; }).join(", ");
    fill("devices", v.devices, "no device yet", function (d) {
      var tr = document.createElement("tr");
      tr.dataset.device = d.device; tr.className = d.state;
      var a = document.createElement("a");
      a.href = "/ui/devices/" + encodeURIComponent(d.device); a.textContent = d.device;
      cell(tr, a); cell(tr, d.mac); cell(tr, d.state); cell(tr, d.step);
      cell(tr, d.wave === null ? "" : String(d.wave)); cell(tr, d.image || "");
      cell(tr, d.progress === null ? "" : bar(d.progress, Math.round(d.progress) + "%" + (d.behind ? " behind" : "")));
      cell(tr, d.detail);
      return tr;
    });
  }
  var status = document.getElementById("status");
  var es = new EventSource("/api/events");
  es.addEventListener("view", function (e) {
    render(JSON.parse(e.data));
    status.textContent = "live, updated " + new Date().toLocaleTimeString();
  });
  es.onerror = function () { status.textContent = "reconnecting..."; };
})();
