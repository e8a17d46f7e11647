// One floating tooltip for the whole page: hover on a pointer device, tap on a touch screen.
// Content is built with DOM nodes (textContent), never from HTML strings.

const tip = () => document.getElementById("tooltip");
let owner = null;

export function showTip(anchor, build) {
  const t = tip();
  t.replaceChildren(build());
  t.hidden = false;
  owner = anchor;
  const a = anchor.getBoundingClientRect();
  const w = t.offsetWidth, h = t.offsetHeight;
  const vw = document.documentElement.clientWidth, vh = document.documentElement.clientHeight;
  let left = Math.min(Math.max(8, a.left + a.width / 2 - w / 2), vw - w - 8);
  let top = a.bottom + 8;
  if (top + h > vh - 8) top = Math.max(8, a.top - h - 8);
  t.style.left = `${left}px`;
  t.style.top = `${top}px`;
}

export function hideTip(anchor) {
  if (anchor && anchor !== owner) return;
  tip().hidden = true;
  owner = null;
}

/** Hover shows, leaving hides, a tap toggles (for touch screens). */
export function attachTip(el, build) {
  el.addEventListener("pointerenter", (e) => { if (e.pointerType === "mouse") showTip(el, build); });
  el.addEventListener("pointerleave", (e) => { if (e.pointerType === "mouse") hideTip(el); });
  el.addEventListener("click", (e) => {
    e.stopPropagation();
    if (owner === el && !tip().hidden) hideTip(el); else showTip(el, build);
  });
}

document.addEventListener("click", () => hideTip());
window.addEventListener("scroll", () => hideTip(), true);

/** A small helper to build elements: h("div", {class: "x"}, "text", child, ...). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
