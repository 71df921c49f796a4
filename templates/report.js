// robaudit report: sortable tables and the confusion tabs. No libraries, no network.
(function () {
  "use strict";
  var collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

  function sortKey(cell, numeric) {
    var v = cell.getAttribute("data-v");
    if (v === null) { v = cell.textContent.trim(); }
    if (!numeric) { return v; }
    return v === "" ? null : parseFloat(v);
  }

  function sortBy(table, th, col) {
    var numeric = th.getAttribute("data-type") === "number";
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) {
      h.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = sortKey(a.cells[col], numeric);
      var y = sortKey(b.cells[col], numeric);
      // Missing figures go last in either direction.
      if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }
      return dir * (numeric ? x - y : collator.compare(x, y));
    });
    var fragment = document.createDocumentFragment();
    rows.forEach(function (r) { fragment.appendChild(r); });
    body.appendChild(fragment);
  }

  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var button = th.querySelector("button");
      if (button) {
        button.addEventListener("click", function () { sortBy(table, th, col); });
      }
    });
  });

  document.querySelectorAll("[role=tablist]").forEach(function (list) {
    var tabs = list.querySelectorAll("[role=tab]");
    tabs.forEach(function (tab) {
      tab.addEventListener("click", function () {
        tabs.forEach(function (other) {
          var selected = other === tab;
          other.setAttribute("aria-selected", selected ? "true" : "false");
          document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
        });
      });
    });
  });
})();
