// The cache map: one bar the width of the session's token budget. Each resident segment (system prompt /
// card, every turn, narration, RAG) is a block as wide as the tokens it holds; what is left is free
// space. Turns the eviction policy dropped are listed as hatched "forgotten" chips, and a segment that
// lost some of its tokens (token-level eviction) shows a hatched edge.
import { attachTip, h } from "./tooltip.js";

export const KIND_LABEL = {
  system: "System / card", user: "User turn", assistant: "Reply", narration: "Narration",
  rag: "RAG", lore: "Lore (world info)", scratch: "Scratch (suggestion)",
};
const fmt = (n) => Number(n ?? 0).toLocaleString("en-US");
const fmtBytes = (n) => (n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${((n ?? 0) / 1024).toFixed(1)} KiB`);

function segTip(seg, budget) {
  return () => {
    const rows = [
      ["Segment", KIND_LABEL[seg.kind] || seg.kind],
      ...(seg.label ? [["Entry", seg.label]] : []),
      ["Turn", seg.turn === null || seg.turn === undefined ? (seg.kind === "system" ? "— (pinned)" : "—") : `#${seg.turn}`],
      ["In memory", `${fmt(seg.tokens)} tokens (${((100 * seg.tokens) / budget).toFixed(1)}% of the budget)`],
    ];
    if (seg.bytes !== undefined) rows.push(["K/V bytes", fmtBytes(seg.bytes)]);
    if (seg.evicted) rows.push(["Evicted", `${fmt(seg.evicted)} tokens`]);
    if (seg.start !== undefined && seg.start !== null) rows.push(["Slots", `${fmt(seg.start)} – ${fmt(seg.start + seg.tokens - 1)}`]);
    if (seg.pinned) rows.push(["Pinned", "never evicted"]);
    return h("div", { class: "tip-seg" },
      h("div", { class: `tip-title k-${seg.kind}` }, h("span", { class: "sw" }), KIND_LABEL[seg.kind] || seg.kind),
      h("table", {}, rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))));
  };
}

/** Render `kv` (GET /kv or an SSE kv event) into the cache-map section. `onPick(turn)` scrolls to a turn. */
export function renderCacheMap(kv, zoom, onPick) {
  const root = document.getElementById("cachemap");
  if (!kv || kv.budget === undefined) { root.hidden = true; return; }
  root.hidden = false;
  // the bar's scale: the whole budget, or (zoomed) only the tokens in use
  const budget = zoom ? Math.max(kv.length || 0, 1) : Math.max(kv.budget, kv.length || 0, 1);
  root.classList.toggle("zoomed", !!zoom);
  const bar = document.getElementById("cm-bar");
  const blocks = [];
  const kinds = new Set();
  for (const seg of kv.segments || []) {
    if (!seg.tokens) continue;
    kinds.add(seg.kind);
    const pct = (100 * seg.tokens) / budget;
    const label = seg.kind === "system" ? "sys" : seg.kind === "lore" && seg.label ? `§ ${seg.label}`
      : seg.turn !== null && seg.turn !== undefined ? `#${seg.turn}` : "";
    const el = h("div", {
      class: `cm-seg k-${seg.kind}${seg.evicted ? " partial" : ""}${seg.live ? " live" : ""}`,
      style: `width:${pct}%`, "data-kind": seg.kind, "data-turn": seg.turn ?? "", "data-tokens": seg.tokens,
      "data-label": seg.label || "",
      "aria-label": `${KIND_LABEL[seg.kind] || seg.kind} ${label} ${seg.tokens} tokens`,
    }, pct > 4.5 ? h("span", { class: "cm-label" }, label) : null);
    attachTip(el, segTip(seg, kv.budget));
    if (seg.turn !== null && seg.turn !== undefined && onPick) el.addEventListener("dblclick", () => onPick(seg.turn));
    blocks.push(el);
  }
  const free = Math.max(0, kv.budget - (kv.length || 0));
  const freeEl = h("div", { class: "cm-free", style: `width:${zoom ? 0 : (100 * free) / budget}%`, "data-tokens": free },
    !zoom && free / budget > 0.12 ? h("span", { class: "cm-label" }, `${fmt(free)} free`) : null);
  attachTip(freeEl, () => h("div", { class: "tip-seg" },
    h("div", { class: "tip-title k-free" }, h("span", { class: "sw" }), "Free space"),
    h("table", {}, h("tr", {}, h("th", {}, "Free"), h("td", {}, `${fmt(free)} of ${fmt(kv.budget)} tokens`)))));
  blocks.push(freeEl);
  bar.replaceChildren(...blocks);
  bar.setAttribute("aria-label", `${kv.length} of ${kv.budget} tokens used`);

  const used = kv.length || 0;
  document.getElementById("cm-stats").replaceChildren(
    h("b", {}, fmt(used)), ` / ${fmt(kv.budget)} tokens`,
    h("span", { class: "dot" }, "·"), `${fmt(free)} free`,
    h("span", { class: "dot" }, "·"), `policy `, h("b", {}, kv.policy || "?"),
    ...(kv.bytes !== undefined ? [h("span", { class: "dot" }, "·"), `${fmtBytes(kv.bytes)} ${kv.kv_format || ""} K/V`] : []),
    h("span", { class: "dot" }, "·"),
    h("span", { class: kv.evicted_tokens ? "ev-count hot" : "ev-count" },
      `${fmt(kv.evicted_tokens)} evicted`, kv.evictions ? ` in ${fmt(kv.evictions)} eviction${kv.evictions > 1 ? "s" : ""}` : ""));

  const gone = kv.evicted_turns || [];
  const legend = ["system", "user", "assistant", "narration", "rag", "lore", "scratch"].filter((k) => kinds.has(k) || ["system", "user", "assistant"].includes(k));
  document.getElementById("cm-legend").replaceChildren(
    ...legend.map((k) => h("span", { class: `lg k-${k}` }, h("span", { class: "sw" }), KIND_LABEL[k])),
    h("span", { class: "lg k-free" }, h("span", { class: "sw" }), "Free"),
    h("span", { class: "lg k-evicted" }, h("span", { class: "sw" }), "Evicted"));

  // one hatched chip per run of consecutive forgotten turns (usually a single run: the oldest turns)
  const runs = [];
  for (const g of gone) {
    const run = runs[runs.length - 1];
    if (run && g.turn === run[run.length - 1].turn + 1) run.push(g); else runs.push([g]);
  }
  const chips = runs.slice(-6).map((run) => {
    const first = run[0], last = run[run.length - 1];
    const tokens = run.reduce((a, g) => a + g.tokens, 0);
    const label = run.length === 1 ? `#${first.turn} ${first.kind} · ${fmt(tokens)} tok`
      : `#${first.turn}–#${last.turn} · ${run.length} turns · ${fmt(tokens)} tok`;
    const el = h("span", { class: `chip evicted k-${run.length === 1 ? first.kind : "mixed"}`,
      "data-turn": first.turn, "data-turns": run.map((g) => g.turn).join(",") }, label);
    attachTip(el, () => h("div", { class: "tip-seg" },
      h("div", { class: "tip-title k-evicted" }, h("span", { class: "sw" }),
        run.length === 1 ? "Forgotten turn" : `${run.length} forgotten turns`),
      h("table", {}, run.slice(-8).map((g) => h("tr", {},
        h("th", {}, `#${g.turn}`), h("td", {}, `${KIND_LABEL[g.kind] || g.kind} · ${fmt(g.tokens)} tokens`))),
        run.length > 8 ? h("tr", {}, h("td", { colspan: 2, class: "muted" }, `…and ${run.length - 8} earlier`)) : null,
        h("tr", {}, h("td", { colspan: 2, class: "muted" }, "Still in the transcript, no longer seen by the model.")))));
    if (onPick) el.addEventListener("dblclick", () => onPick(first.turn));
    return el;
  });
  const forgotten = document.getElementById("cm-forgotten");
  if (gone.length || kv.evicted_tokens) {
    forgotten.replaceChildren(...[h("span", { class: "fg-title" }, "Forgotten:"),
      runs.length > 6 ? h("span", { class: "chip evicted more" }, `+${runs.length - 6} earlier runs`) : null,
      ...chips,
      !gone.length ? h("span", { class: "chip evicted" }, `${fmt(kv.evicted_tokens)} tokens (token-level)`) : null,
    ].filter(Boolean));
    forgotten.hidden = false;
  } else {
    forgotten.replaceChildren();
    forgotten.hidden = true;
  }
}
