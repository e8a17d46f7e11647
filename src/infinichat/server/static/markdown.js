// A small, safe Markdown renderer. Everything is HTML-escaped FIRST; only a whitelist of constructs is
// then turned into tags: paragraphs, line breaks, fenced and inline code, **bold**, *italic* / _italic_,
// ~~strike~~, "- " / "1. " lists, "> " quotes, "#" headings and [links](http(s) only). No raw HTML ever
// reaches the page, whatever the model or a character card writes.

export function escapeHtml(s) {
  return String(s)
    .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// Inline constructs on already-escaped text. Code spans are cut out first so nothing inside them changes.
function inline(esc) {
  const codes = [];
  let s = esc.replace(/`([^`\n]+)`/g, (_, c) => { codes.push(c); return `\u0000${codes.length - 1}\u0000`; });
  // links: [text](http://...) ; the URL is escaped text already, and must start with http:// or https://
  s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
    (_, text, url) => `<a href="${url}" target="_blank" rel="noopener noreferrer nofollow">${text}</a>`);
  s = s.replace(/\*\*([^*\n]+?)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/__([^_\n]+?)__/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^*\w])\*(?!\s)([^*\n]+?)\*(?!\w)/g, "$1<em>$2</em>");
  s = s.replace(/(^|[^_\w])_(?!\s)([^_\n]+?)_(?!\w)/g, "$1<em>$2</em>");
  s = s.replace(/~~([^~\n]+?)~~/g, "<del>$1</del>");
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[+i]}</code>`);
}

/** Markdown text -> safe HTML string. */
export function renderMarkdown(text) {
  const lines = escapeHtml(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let para = [];
  const flush = () => {
    if (para.length) out.push(`<p>${para.map(inline).join("<br>")}</p>`);
    para = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
    if (fence) {
      flush();
      const body = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) body.push(lines[i++]);
      const lang = fence[1] ? ` data-lang="${fence[1]}"` : "";
      out.push(`<pre${lang}><code>${body.join("\n")}</code></pre>`);
      continue;
    }
    if (/^\s*$/.test(line)) { flush(); continue; }
    const h = line.match(/^(#{1,4})\s+(.*)$/);
    if (h) { flush(); out.push(`<h${h[1].length + 2}>${inline(h[2])}</h${h[1].length + 2}>`); continue; }
    const listRe = /^\s*([-*+]|\d{1,3}[.)])\s+(.*)$/;
    if (listRe.test(line) && !/^\s*\*[^*\s][^*]*\*\s*$/.test(line)) {
      flush();
      const ordered = /^\s*\d/.test(line);
      const items = [];
      while (i < lines.length && listRe.test(lines[i]) && /^\s*\d/.test(lines[i]) === ordered) {
        items.push(`<li>${inline(lines[i].match(listRe)[2])}</li>`);
        i++;
      }
      i--;
      out.push(ordered ? `<ol>${items.join("")}</ol>` : `<ul>${items.join("")}</ul>`);
      continue;
    }
    const q = line.match(/^\s*&gt;\s?(.*)$/);
    if (q) {
      flush();
      const body = [q[1]];
      while (i + 1 < lines.length && /^\s*&gt;/.test(lines[i + 1])) body.push(lines[++i].replace(/^\s*&gt;\s?/, ""));
      out.push(`<blockquote>${body.map(inline).join("<br>")}</blockquote>`);
      continue;
    }
    para.push(line);
  }
  flush();
  return out.join("");
}
