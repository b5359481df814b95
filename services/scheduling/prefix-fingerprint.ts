/**
 * A request's prompt prefix as a few fingerprints (CONTRACT 16.2), read from its parsed body,
 * which is never changed: the cumulative hashes of its leading messages (each hash covers every
 * message before it too), so the next turn of a conversation, which resends them all plus the
 * new ones, shares the hashes of the last turn's whole prompt. A bare prompt (`/api/generate`,
 * `/v1/completions`) is hashed at fixed character boundaries instead, so a longer prompt with the
 * same beginning matches. A client that names its conversation (OpenAI's `prompt_cache_key`, then
 * `user`, then the header `X-Session-Id`) is matched by that name alone.
 *
 * The hash is a running 64-bit one (PrefixHash), not a cryptographic digest: Node's sha256 costs
 * more to set up and to copy per prefix than a short prompt costs to hash, and the map is only a
 * hint (a collision sends one request to a server without its prefix; nothing else rests on it).
 *
 * Token counts are estimates: characters / 4 (what a tokenizer gives for English text, roughly;
 * the servers' own counts correct the fairness charge when the answer ends). No Fastify here.
 */

/** Characters per estimated token. */
export const CHARS_PER_TOKEN = 4
/** A bare prompt is hashed at every multiple of this many characters (and at its end). */
export const PROMPT_CHUNK_CHARS = 512
/** Fingerprints kept per request: the first few prefixes and the last few (the longest). */
export const FIRST_HASHES = 2
export const LAST_HASHES = 6

export interface PromptFingerprint {
  /** Prefix hashes, shortest prefix first (at most FIRST_HASHES + LAST_HASHES). */
  hashes: string[]
  /** The estimated prompt tokens each hash's prefix covers (same order). */
  tokens: number[]
  /**
   * The tokens a server that served that prefix holds for this prompt: the prefix, and the
   * assistant message that follows it when there is one (its own answer, kept in its cache too).
   */
  held: number[]
  /** The whole prompt's estimated tokens. */
  promptTokens: number
  /** The output tokens asked for at most, when the body says (`num_predict`, `max_tokens`, ...). */
  maxOutputTokens?: number
}

/**
 * A running hash of text, snapshot at every prefix: two 32-bit lanes multiplied per character, and
 * cyrb53's final mix on digest (which leaves the running state as it was).
 */
export class PrefixHash {
  private h1 = 0xdeadbeef
  private h2 = 0x41c6ce57

  update (text: string): this {
    let h1 = this.h1
    let h2 = this.h2
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i)
      h1 = Math.imul(h1 ^ c, 2654435761)
      h2 = Math.imul(h2 ^ c, 1597334677)
    }
    this.h1 = h1
    this.h2 = h2
    return this
  }

  /** The hash of everything so far, 13 or fewer characters per lane. */
  digest (): string {
    let h1 = Math.imul(this.h1 ^ (this.h1 >>> 16), 2246822507)
    h1 ^= Math.imul(this.h2 ^ (this.h2 >>> 13), 3266489909)
    let h2 = Math.imul(this.h2 ^ (this.h2 >>> 16), 2246822507)
    h2 ^= Math.imul(h1 ^ (h1 >>> 13), 3266489909)
    return (h1 >>> 0).toString(36) + '.' + (h2 >>> 0).toString(36)
  }
}

const estimate = (chars: number): number => Math.ceil(chars / CHARS_PER_TOKEN)

/** Routes whose body is a list of messages, and those whose body is one prompt string. */
const MESSAGE_PATHS = new Set(['/api/chat', '/v1/chat/completions', '/v1/messages', '/v1/responses'])
const PROMPT_PATHS = new Set(['/api/generate', '/v1/completions'])

export function fingerprints (path: string): boolean {
  return MESSAGE_PATHS.has(path) || PROMPT_PATHS.has(path)
}

/** The fingerprinted API path a route's URL ends with (`/maestro/api/chat` → `/api/chat`), if any. */
export function fingerprintPathOf (routeUrl: string | undefined): string | undefined {
  if (routeUrl === undefined) return undefined
  for (const path of [...MESSAGE_PATHS, ...PROMPT_PATHS]) if (routeUrl.endsWith(path)) return path
  return undefined
}

type Body = Record<string, unknown>

/** The text of a message's content, whatever its shape (a string, or parts with `text`). */
function textLength (value: unknown): number {
  if (typeof value === 'string') return value.length
  if (Array.isArray(value)) {
    let n = 0
    for (const part of value) n += textLength(part)
    return n
  }
  if (value != null && typeof value === 'object') {
    const o = value as Body
    let n = 0
    for (const k of ['content', 'text', 'input', 'output', 'arguments']) n += textLength(o[k])
    return n
  }
  return 0
}

/** Keeps the first FIRST_HASHES and the last LAST_HASHES of the cumulative prefixes. */
function bounded (hashes: string[], tokens: number[], held: number[]): { hashes: string[], tokens: number[], held: number[] } {
  if (hashes.length <= FIRST_HASHES + LAST_HASHES) return { hashes, tokens, held }
  const keep = <T>(a: T[]): T[] => [...a.slice(0, FIRST_HASHES), ...a.slice(a.length - LAST_HASHES)]
  return { hashes: keep(hashes), tokens: keep(tokens), held: keep(held) }
}

/** The cumulative hashes of a sequence of parts (each part's JSON text). */
function cumulative (parts: unknown[]): { hashes: string[], tokens: number[], held: number[], chars: number } {
  const hash = new PrefixHash()
  const hashes: string[] = []
  const tokens: number[] = []
  const held: number[] = []
  let chars = 0
  for (const [i, part] of parts.entries()) {
    // an assistant message is the server's own answer to the prefix before it: cached with it
    if (i > 0 && isAssistant(part)) held[i - 1] = estimate(chars + textLength(part))
    const text = JSON.stringify(part) ?? ''
    // a length before each part: no two different lists of parts hash alike
    hash.update(`${text.length}:`).update(text)
    chars += textLength(part)
    hashes.push(hash.digest())
    tokens.push(estimate(chars))
    held.push(estimate(chars))
  }
  return { hashes, tokens, held, chars }
}

const isAssistant = (part: unknown): boolean => part != null && typeof part === 'object' && (part as Body).role === 'assistant'

/** The hashes of a bare prompt at every PROMPT_CHUNK_CHARS characters and at its end. */
function chunked (prefix: string, prompt: string): { hashes: string[], tokens: number[], held: number[], chars: number } {
  const hash = new PrefixHash().update(`${prefix.length}:`).update(prefix)
  const hashes: string[] = []
  const tokens: number[] = []
  let at = 0
  while (at < prompt.length) {
    const end = Math.min(prompt.length, at + PROMPT_CHUNK_CHARS)
    hash.update(prompt.slice(at, end))
    // a partial last chunk is hashed too: the same prompt again matches whole
    hashes.push(hash.digest())
    tokens.push(estimate(prefix.length + end))
    at = end
  }
  return { hashes, tokens, held: tokens, chars: prefix.length + prompt.length }
}

const numberOr = (...values: unknown[]): number | undefined => {
  for (const v of values) if (typeof v === 'number' && Number.isFinite(v) && v > 0) return v
  return undefined
}

/**
 * The fingerprints of one request's body to `path` (the route's upstream path); undefined for a
 * route without a prompt. `sessionId` is the `X-Session-Id` header's value.
 */
export function fingerprintOf (path: string, body: unknown, sessionId?: string): PromptFingerprint | undefined {
  if (!fingerprints(path) || body == null || typeof body !== 'object' || Array.isArray(body)) return undefined
  const b = body as Body
  let parts: { hashes: string[], tokens: number[], held: number[], chars: number }
  if (PROMPT_PATHS.has(path)) {
    const prompt = typeof b.prompt === 'string' ? b.prompt : JSON.stringify(b.prompt ?? '')
    parts = chunked(typeof b.system === 'string' ? b.system : '', prompt)
  } else if (path === '/v1/responses') {
    const input = Array.isArray(b.input) ? b.input : [b.input ?? '']
    parts = cumulative(b.instructions != null ? [{ instructions: b.instructions }, ...input] : input)
  } else {
    const messages = Array.isArray(b.messages) ? b.messages : []
    parts = cumulative(b.system != null ? [{ system: b.system }, ...messages] : messages)
  }
  const promptTokens = estimate(parts.chars)
  const options = b.options != null && typeof b.options === 'object' ? b.options as Body : {}
  const maxOutputTokens = numberOr(options.num_predict, b.max_tokens, b.max_completion_tokens, b.max_output_tokens)
  // A conversation named by the client: that name is its one fingerprint.
  const named = [b.prompt_cache_key, b.user, sessionId].find((v) => typeof v === 'string' && v !== '') as string | undefined
  if (named !== undefined) {
    const hash = 'k' + new PrefixHash().update(named).digest()
    return { hashes: [hash], tokens: [promptTokens], held: [promptTokens], promptTokens, maxOutputTokens }
  }
  if (parts.hashes.length === 0) return undefined
  const { hashes, tokens, held } = bounded(parts.hashes, parts.tokens, parts.held)
  return { hashes, tokens, held, promptTokens, maxOutputTokens }
}
