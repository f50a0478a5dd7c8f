// Re-fetch every [data-refresh] fragment every 5 s while the tab is visible; no framework.
const REFRESH_MS = 5000;
for (const element of document.querySelectorAll("[data-refresh]")) {
  setInterval(async () => {
    if (document.hidden) return;
    try {
      const response = await fetch(element.dataset.refresh, { credentials: "same-origin" });
      if (response.status === 401) location.reload(); // the session ended: show the login
      else if (response.ok) element.innerHTML = await response.text();
    } catch {
      // the node is unreachable for a moment: keep showing the last view
    }
  }, REFRESH_MS);
}
// Ask before destructive actions (forms with data-confirm).
document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});
