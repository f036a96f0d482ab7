// A small chat box on a fine-tuned model: POST /v1/chat/completions, the conversation kept in the page.
import { post } from "./api.js";
import { h } from "./dom.js";

export function chatBox(model) {
  const history = [];
  const list = h("ol", { class: "chatlog", "aria-live": "polite", id: "chat-log" });
  const input = h("textarea", { id: "chat-input", rows: 2, required: true });
  const maxTokens = h("input", { id: "chat-max", type: "number", min: 1, max: 512, value: "16" });
  const error = h("p", { class: "error", role: "alert", id: "chat-error" });
  const send = h("button", { type: "submit", class: "primary" }, "Send");
  const line = (who, text) => list.append(h("li", {}, h("span", { class: "who" }, `${who}:`), text));
  const form = h("form", { onsubmit: async (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    error.textContent = "";
    history.push({ role: "user", content: text });
    line("You", text);
    input.value = "";
    send.disabled = true;
    try {
      const out = await post("/chat/completions", { model, messages: history,
        max_tokens: Number(maxTokens.value) || 16 });
      const reply = out.choices[0].message.content;
      history.push({ role: "assistant", content: reply });
      line("Model", reply);
    } catch (e) {
      history.pop();
      error.textContent = e.message;
    } finally {
      send.disabled = false;
      input.focus();
    }
  } },
  h("label", { for: "chat-input" }, "Message"), input,
  h("label", { for: "chat-max" }, "Max tokens"), maxTokens, h("p", {}, send), error);
  return h("section", { class: "panel", "aria-labelledby": "chat-h" },
    h("h2", { id: "chat-h" }, "Try the model"), h("p", { class: "muted" }, h("code", {}, model)), list, form);
}
