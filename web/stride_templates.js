// Stride: human titles and one-line descriptions on this pack's cards in the Templates dialog.
//
// The frontends of the supported hosts (comfyui-frontend-package 1.32.9 with ComfyUI 0.3.75, 1.49.6 with
// 0.33.0) read no metadata for a custom node pack's templates: a card shows the file name as its title and
// again, with '-' and '_' turned into spaces, as its description (1.32.9) or shows no description (1.49.6).
// This extension reads the titles and descriptions from workflow_templates.json (written by
// scripts/make_workflows.py, in the form of the core templates' index.json) and writes them into the pack's
// cards when the dialog shows them. A card is
// taken as this pack's only if no other pack lists a template of the same name.
import { api } from "../../scripts/api.js";

const INDEX_URL = new URL("./workflow_templates.json", import.meta.url);
const PACK = decodeURIComponent(INDEX_URL.pathname.split("/").slice(-2, -1)[0]); // extensions/<pack>/...
const CARD = "[data-testid^='template-workflow-']";
const MARK = "strideTemplate";

async function loadTemplates() {
  const [index, listed] = await Promise.all([
    fetch(INDEX_URL).then((r) => (r.ok ? r.json() : [])),
    api.getWorkflowTemplates().catch(() => ({})),
  ]);
  const elsewhere = new Set(Object.entries(listed).filter(([pack]) => pack !== PACK).flatMap(([, names]) => names));
  const ours = new Set(listed[PACK] || []);
  const templates = new Map();
  for (const category of index) {
    for (const template of category.templates || []) {
      if (ours.has(template.name) && !elsewhere.has(template.name)) templates.set(template.name, template);
    }
  }
  return templates;
}

function label(card, templates) {
  const name = card.dataset.testid.slice("template-workflow-".length);
  const template = templates.get(name);
  const title = card.querySelector("h3");
  if (!template || !title || card.dataset[MARK] === name) return;
  // 1.32.9 shows the name again as a description paragraph; 1.49.6 shows none for a pack's template.
  let description = title.parentElement.parentElement.querySelector("p");
  if (!description) {
    description = document.createElement("p");
    description.className = "m-0 line-clamp-2 text-sm text-muted stride-template-description";
    title.after(description);
  }
  title.textContent = template.title;
  title.title = template.title;
  description.textContent = template.description;
  description.title = template.description;
  const image = card.querySelector("img");
  if (image) image.alt = template.title;
  card.dataset[MARK] = name;
}

loadTemplates().then((templates) => {
  if (!templates.size) return;
  const labelAll = (root) => root.querySelectorAll?.(CARD).forEach((card) => label(card, templates));
  labelAll(document);
  new MutationObserver((mutations) => {
    for (const mutation of mutations) {
      for (const node of mutation.addedNodes) {
        if (node.nodeType !== Node.ELEMENT_NODE) continue;
        if (node.matches(CARD)) label(node, templates);
        labelAll(node);
      }
      if (mutation.type === "characterData" || mutation.target.nodeType === Node.ELEMENT_NODE) {
        const card = (mutation.target.nodeType === Node.ELEMENT_NODE ? mutation.target : mutation.target.parentElement)
          ?.closest?.(CARD);
        if (card && card.dataset[MARK] && card.querySelector("h3")?.textContent !== templates.get(card.dataset[MARK])?.title) {
          delete card.dataset[MARK];
          label(card, templates);
        }
      }
    }
  }).observe(document.body, { childList: true, subtree: true, characterData: true });
});
