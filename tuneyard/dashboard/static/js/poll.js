// Live updates by polling the API: one call chain at a time per view, stopped when the view goes away.
export function poll(fn, ms = 2000) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    if (stopped) return;
    let again = true;
    try {
      again = (await fn()) !== false;
    } catch (e) {
      console.warn("poll:", e.message);
    }
    if (!stopped && again) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
