// Stride: the newest UI output of a node that the server's /history still holds, for this workflow.
// The live chart and the results tables use it to show the last run again after a page reload (the
// frontend itself does not keep node outputs across reloads). Not an extension: the others import it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

let recent = null; // one /history request serves every node of a graph being loaded

/** ``output[key]`` of the newest history entry of this node (same workflow, node id and type), or null. */
export async function latestOutput(node, key) {
  recent ??= api.fetchApi("/history?max_items=64").then((r) => r.json()).catch(() => ({}));
  const entries = Object.values(await recent);
  setTimeout(() => { recent = null; }, 2000);
  const workflowId = app.graph?.id;
  for (const entry of entries.reverse()) {
    const output = entry.outputs?.[String(node.id)];
    const workflow = entry.prompt?.[3]?.extra_pnginfo?.workflow;
    if (!output?.[key] || (workflowId && workflow?.id && workflow.id !== workflowId)) continue;
    if (entry.prompt?.[2]?.[String(node.id)]?.class_type !== node.comfyClass) continue;
    return output;
  }
  return null;
}
