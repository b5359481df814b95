/**
 * The key a model name is matched by: case-insensitive, with a trailing `:latest` ignored
 * (`llama3` ≡ `llama3:latest` ≡ `LLAMA3`), as Ollama itself matches names. Other tags count.
 */
export function modelKey (name: string): string {
  const lower = name.toLowerCase()
  return lower.endsWith(':latest') ? lower.slice(0, -':latest'.length) : lower
}

/** The longest model name the gateway takes (CONTRACT section 8): names end up in queues, logs and metric labels. */
export const MODEL_NAME_MAX = 256
