// Live pages: one EventSource per page; the server sends each change to work items.
// Values are put into the page as text, never as HTML.
"use strict";
(function () {
  const live = document.body.dataset.live;
  if (!live) return;
  // the changes since this page was rendered, then each as it comes
  const source = new EventSource("/events?since=" + encodeURIComponent(document.body.dataset.since));
  let refreshTimer = null;

  // The item page again, rendered (and escaped) by the server, in place of this one's,
  // unless the person is typing into one of its forms.
  function refreshItem() {
    const item = document.getElementById("item");
    const typing = item.contains(document.activeElement) &&
      document.activeElement.matches("input, textarea, select");
    if (typing) return;
    fetch(item.dataset.src, {credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) return;
        const fresh = new DOMParser().parseFromString(html, "text/html").getElementById("item");
        if (fresh) item.replaceWith(document.adoptNode(fresh));
      });
  }

  function typing() {
    return document.activeElement && document.activeElement.matches("input, textarea, select");
  }

  // After the feed was lost (the console restarted, the network dropped) this page may have
  // missed changes: the item page fetches itself again, any other page reloads, unless the
  // person is typing.
  let broken = false;
  source.addEventListener("error", function () { broken = true; });
  source.addEventListener("open", function () {
    if (!broken) return;
    broken = false;
    if (live === "work-item") refreshItem();
    else if (!typing()) location.reload();
  });

  function setState(el, state) {
    el.textContent = state;
    el.className = el.className.replace(/\bstate-\S+/g, "").trim() + " state-" + state;
  }

  source.addEventListener("change", function (event) {
    const c = JSON.parse(event.data);
    if (live === "work-item") {
      const item = document.getElementById("item");
      if (item && item.dataset.id === c.work_id) {
        setState(document.getElementById("state"), c.state);
        clearTimeout(refreshTimer);  // one fetch for a burst of changes
        refreshTimer = setTimeout(refreshItem, 150);
      }
    } else if (live === "diff") {
      const pair = document.getElementById("pair");
      if (pair && (pair.dataset.a === c.work_id || pair.dataset.b === c.work_id) && !typing()) {
        clearTimeout(refreshTimer);
        refreshTimer = setTimeout(function () { location.reload(); }, 300);
      }
    } else if (live === "work-list") {
      const row = document.querySelector('tr[data-id="' + CSS.escape(c.work_id) + '"]');
      const state = row && row.querySelector(".state"), reason = row && row.querySelector(".reason");
      if (state) setState(state, c.state);
      if (reason) reason.textContent = c.reason || "";
    }
  });

  // The chart's geometry comes computed from the server: move the bars, redraw the line.
  source.addEventListener("chart", function (event) {
    if (live !== "overview") return;
    const chart = JSON.parse(event.data);
    const svg = document.querySelector("#chart svg");
    const height = svg.viewBox.baseVal.height;
    svg.querySelectorAll("g").forEach(function (g, i) {
      const bar = chart.bars[i];
      if (!bar) return;
      g.querySelector("title").textContent = bar.title;
      const finished = g.querySelector("rect.finished"), dead = g.querySelector("rect.dead");
      finished.setAttribute("y", height - bar.finished);
      finished.setAttribute("height", bar.finished);
      dead.setAttribute("y", height - bar.dead);
      dead.setAttribute("height", bar.dead);
    });
    svg.querySelector("polyline").setAttribute("points", chart.depth);
    ["most_finished", "total_finished", "total_dead", "most_queued"].forEach(function (k) {
      document.getElementById("chart-" + k.replace("_", "-")).textContent = chart[k];
    });
  });

  source.addEventListener("counts", function (event) {
    if (live !== "overview") return;
    const counts = JSON.parse(event.data);
    document.querySelectorAll("[id^=count-]").forEach(function (el) {
      el.textContent = counts[el.id.slice(6)] || 0;
    });
  });
})();
