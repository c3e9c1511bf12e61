// Type-ahead for the search box: asks /console/suggest as the person types, arrow keys to move,
// Enter to open, Escape to close. Without JavaScript the form still searches.
(function () {
  const input = document.getElementById("q");
  const list = document.getElementById("suggestions");
  if (!input || !list) return;
  let timer = null, active = -1, asked = 0;

  function close() { list.hidden = true; list.innerHTML = ""; active = -1; input.setAttribute("aria-expanded", "false"); }
  function choose(index) {
    const items = list.querySelectorAll("li");
    items.forEach((li, i) => li.setAttribute("aria-selected", i === index ? "true" : "false"));
    active = index;
    if (items[index]) input.setAttribute("aria-activedescendant", items[index].id);
  }
  function show(rows) {
    list.innerHTML = "";
    rows.forEach((row, i) => {
      const li = document.createElement("li");
      li.id = "suggestion-" + i;
      li.setAttribute("role", "option");
      li.dataset.href = "/customers/" + encodeURIComponent(row.customer_id);
      li.textContent = row.name;
      const detail = document.createElement("span");
      detail.className = "note";
      detail.textContent = row.detail;
      li.appendChild(detail);
      li.addEventListener("mousedown", (e) => { e.preventDefault(); location.href = li.dataset.href; });
      list.appendChild(li);
    });
    list.hidden = rows.length === 0;
    input.setAttribute("aria-expanded", rows.length ? "true" : "false");
    active = -1;
  }
  input.addEventListener("input", () => {
    clearTimeout(timer);
    const q = input.value.trim();
    if (q.length < 2) { close(); return; }
    timer = setTimeout(async () => {
      const mine = ++asked;
      const answer = await fetch("/console/suggest?q=" + encodeURIComponent(q), { credentials: "same-origin" });
      if (mine !== asked || !answer.ok) return;
      show(await answer.json());
    }, 150);
  });
  input.addEventListener("keydown", (e) => {
    const items = list.querySelectorAll("li");
    if (list.hidden || !items.length) return;
    if (e.key === "ArrowDown") { e.preventDefault(); choose((active + 1) % items.length); }
    else if (e.key === "ArrowUp") { e.preventDefault(); choose((active - 1 + items.length) % items.length); }
    else if (e.key === "Escape") { close(); }
    else if (e.key === "Enter" && active >= 0) { e.preventDefault(); location.href = items[active].dataset.href; }
  });
  input.addEventListener("blur", () => setTimeout(close, 150));
})();

// The dashboard stays live while it is open: every few seconds it asks which view position the
// newest drawing shows (asking also gets the charts redrawn when the view has moved on) and, when
// that is newer than what the page shows, swaps in the new charts without reloading the page.
(function () {
  const live = document.getElementById("live");
  if (!live) return;
  async function check() {
    try {
      const state = await fetch("/console/dashboard-state", { credentials: "same-origin" });
      if (!state.ok) return;
      const { shown } = await state.json();
      if (shown === Number(live.dataset.shown)) return;
      const answer = await fetch("/dashboard", { credentials: "same-origin" });
      if (!answer.ok) return;
      const fresh = new DOMParser().parseFromString(await answer.text(), "text/html").getElementById("live");
      if (fresh) { live.innerHTML = fresh.innerHTML; live.dataset.shown = fresh.dataset.shown; }
    } finally {
      setTimeout(check, 3000);
    }
  }
  setTimeout(check, 3000);
})();
