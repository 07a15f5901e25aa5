'''Our extension to the web editor (a small ES module the editor loads from ``/api/extensions``).

It makes the editor's default graph ours: where the editor would open its own default graph (a new
browser, or "Load Default Workflow"), it opens our quickstart example instead.
'''

from __future__ import annotations

EXTENSION_URL = "/extensions/lora-nodes/editor.js"

EDITOR_EXTENSION = """\
// lora-nodes: open our quickstart graph where the editor would open its own default graph.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

let quickstart = null;

app.registerExtension({
  name: "lora-nodes.quickstart",
  async init() {
    try {
      const answer = await api.fetchApi("/workflow_templates/lora-nodes/quickstart.json");
      if (answer.ok) quickstart = await answer.json();
    } catch (error) {
      console.warn("lora-nodes: no quickstart graph", error);
    }
    const loadGraphData = app.loadGraphData.bind(app);
    // called without a graph, the editor loads its own default one: ours is the quickstart
    app.loadGraphData = (graphData, ...rest) => loadGraphData(graphData || quickstart || graphData, ...rest);
  },
});
"""
