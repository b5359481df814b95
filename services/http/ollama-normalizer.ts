/**
 * Normalization of Ollama request bodies on their way through the gateway.
 *
 * The body is forwarded byte-for-byte except two top-level members:
 *  - `keep_alive` is forced to the configured value (unless the configuration is `passthrough`);
 *  - `stream` is set to `true` when it is absent or `null` (any other value is left alone).
 *
 * The raw JSON text is never re-serialized: number formatting, big integers, key order,
 * whitespace and escapes of every other member survive untouched. The raw text is scanned
 * once for the top-level members and only the value spans of `keep_alive` / `stream` are
 * replaced (every occurrence, should the client send a key twice), or a member is inserted
 * after the last existing one when the key is absent.
 */

/** How `keep_alive` is handled: left as the client sent it, or forced to a JSON literal. */
export type KeepAlive = { mode: 'passthrough' } | { mode: 'force', json: string /* the JSON literal to write, e.g. '-1' or '"5m"' */ }

/** The value of OLLAMA_KEEP_ALIVE when the env var is not set. */
export const DEFAULT_KEEP_ALIVE = '-1'

const NUMBER_LITERAL = /^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?$/

/**
 * Parses the OLLAMA_KEEP_ALIVE text: `passthrough` → leave the client's keep_alive alone;
 * a JSON number literal (`-1`, `300`, `0`, `1.5`, `1e3`) → forced as that number;
 * anything else (`5m`, `-1m`, `1h30m`) → forced as a JSON string. The text is not trimmed.
 * Throws on an empty string and on a number literal out of the double range (e.g. `1e999`).
 */
export function parseKeepAlive (value: string): KeepAlive {
  if (value === '') {
    throw new Error('keep_alive setting must not be empty (use "passthrough" to keep the client\'s value)')
  }
  if (value === 'passthrough') return { mode: 'passthrough' }
  if (NUMBER_LITERAL.test(value)) {
    if (!Number.isFinite(Number(value))) throw new Error(`keep_alive setting out of range: ${value}`)
    return { mode: 'force', json: value }
  }
  return { mode: 'force', json: JSON.stringify(value) }
}

export interface NormalizeResult { body: string, changed: boolean }

// Single-entry cache of the decoded forced value (the configuration rarely changes).
let cachedJson = ''
let cachedValue: unknown

function forcedValue (json: string): unknown {
  if (json !== cachedJson) {
    cachedValue = JSON.parse(json)
    cachedJson = json
  }
  return cachedValue
}

const QUOTE = 0x22
const BACKSLASH = 0x5c
const COMMA = 0x2c
const OPEN_BRACE = 0x7b
const CLOSE_BRACE = 0x7d
const OPEN_BRACKET = 0x5b
const CLOSE_BRACKET = 0x5d

function isWs (c: number): boolean {
  return c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09
}

/** Index of the closing quote of the string whose opening quote is at `start`. */
function stringEnd (raw: string, start: number): number {
  let j = start
  for (;;) {
    j = raw.indexOf('"', j + 1)
    if (j === -1) throw new SyntaxError('unterminated string in JSON body')
    // The quote is escaped when preceded by an odd number of backslashes.
    let k = j - 1
    while (raw.charCodeAt(k) === BACKSLASH) k--
    if (((j - 1 - k) & 1) === 0) return j
  }
}

const KEY_OTHER = 0
const KEY_KEEP_ALIVE = 1
const KEY_STREAM = 2

/** Which of the interesting keys the string raw[start..end] (quotes included) decodes to. */
function keyKind (raw: string, start: number, end: number): number {
  const escaped = raw.indexOf('\\', start + 1)
  if (escaped !== -1 && escaped < end) {
    const key = JSON.parse(raw.slice(start, end + 1)) as string
    return key === 'keep_alive' ? KEY_KEEP_ALIVE : key === 'stream' ? KEY_STREAM : KEY_OTHER
  }
  const len = end - start - 1
  if (len === 10 && raw.startsWith('keep_alive', start + 1)) return KEY_KEEP_ALIVE
  if (len === 6 && raw.startsWith('stream', start + 1)) return KEY_STREAM
  return KEY_OTHER
}

/** Position right after the last non-whitespace character before `close` (a `}`). */
function trimEnd (raw: string, close: number): number {
  let p = close
  while (p > 0 && isWs(raw.charCodeAt(p - 1))) p--
  return p
}

/** The separator before a member inserted at p, which is right after the last member's value or right after `{`. */
function separatorAt (raw: string, p: number): string {
  return raw.charCodeAt(p - 1) === OPEN_BRACE ? '' : ','
}

/**
 * Forces `keep_alive` and defaults `stream` to true in the raw JSON text of an Ollama request.
 * `parsed` must be JSON.parse(raw) (an object). When nothing needs changing, returns `raw`
 * itself with `changed: false`.
 */
export function normalizeOllamaBody (raw: string, parsed: Record<string, unknown>, keepAlive: KeepAlive): NormalizeResult {
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new TypeError('Ollama request body must be a JSON object')
  }
  const hasStream = Object.hasOwn(parsed, 'stream')
  const fixStream = !hasStream || parsed.stream === null
  const hasKeepAlive = Object.hasOwn(parsed, 'keep_alive')
  const kaJson = keepAlive.mode === 'force' ? keepAlive.json : ''
  const fixKeepAlive = keepAlive.mode === 'force' && (!hasKeepAlive || parsed.keep_alive !== forcedValue(kaJson))
  if (!fixStream && !fixKeepAlive) return { body: raw, changed: false }

  let insertion = ''
  if (fixKeepAlive && !hasKeepAlive) insertion = '"keep_alive":' + kaJson
  if (!hasStream) insertion += (insertion === '' ? '' : ',') + '"stream":true'
  const replaceKeepAlive = fixKeepAlive && hasKeepAlive
  const replaceStream = fixStream && hasStream

  if (!replaceKeepAlive && !replaceStream) {
    // Insertion only: the top-level object's `}` is the last one in the text.
    const close = raw.lastIndexOf('}')
    if (close === -1) throw new SyntaxError('JSON body is not an object')
    const p = trimEnd(raw, close)
    return { body: raw.slice(0, p) + separatorAt(raw, p) + insertion + raw.slice(p), changed: true }
  }

  const open = raw.indexOf('{')
  if (open === -1) throw new SyntaxError('JSON body is not an object')
  const n = raw.length
  let out = ''
  let copied = 0 // raw[0..copied) is already in out (possibly replaced)
  let depth = 1
  let expectKey = true
  let pending: string | null = null // replacement for the value of the current top-level member
  let valueStart = 0
  let close = -1
  let i = open + 1

  while (i < n) {
    const c = raw.charCodeAt(i)
    if (c === QUOTE) {
      const end = stringEnd(raw, i)
      if (depth === 1 && expectKey) {
        expectKey = false
        const kind = keyKind(raw, i, end)
        if ((kind === KEY_KEEP_ALIVE && replaceKeepAlive) || (kind === KEY_STREAM && replaceStream)) {
          let k = end + 1
          while (isWs(raw.charCodeAt(k))) k++
          k++ // the ':'
          while (isWs(raw.charCodeAt(k))) k++
          pending = kind === KEY_STREAM ? 'true' : kaJson
          valueStart = k
          i = k
          continue
        }
      }
      i = end + 1
      continue
    }
    if (c === OPEN_BRACE || c === OPEN_BRACKET) {
      depth++
    } else if (c === CLOSE_BRACE || c === CLOSE_BRACKET) {
      if (--depth === 0) {
        close = i
        break
      }
    } else if (c === COMMA && depth === 1) {
      expectKey = true
      if (pending !== null) {
        // End of a member whose value is replaced: keep the whitespace before the ','.
        out += raw.slice(copied, valueStart) + pending
        copied = trimEnd(raw, i)
        pending = null
      }
    }
    i++
  }
  if (close === -1) throw new SyntaxError('unterminated JSON object')
  if (pending !== null) {
    out += raw.slice(copied, valueStart) + pending
    copied = trimEnd(raw, close)
  }
  if (insertion !== '') {
    const p = trimEnd(raw, close)
    out += raw.slice(copied, p) + separatorAt(raw, p) + insertion
    copied = p
  }
  return { body: out + raw.slice(copied), changed: true }
}

/**
 * The body with its top-level `model` member's value replaced by `model` (every occurrence, should
 * the client send it twice), every other byte as sent: an alias becomes its target, a request
 * taken by a fallback names the fallback (CONTRACT 17, the one rewrite besides the two above).
 * One scan of the text, no parse; used for every leased route's JSON body, Ollama's or not.
 */
export function withModel (raw: string, model: string, key: 'model' | 'name' = 'model'): string {
  const open = raw.indexOf('{')
  if (open === -1) throw new SyntaxError('JSON body is not an object')
  const value = JSON.stringify(model)
  const n = raw.length
  let out = ''
  let copied = 0
  let depth = 1
  let expectKey = true
  let i = open + 1
  while (i < n) {
    const c = raw.charCodeAt(i)
    if (c === QUOTE) {
      const end = stringEnd(raw, i)
      if (depth === 1 && expectKey) {
        expectKey = false
        if (isKey(raw, i, end, key)) {
          let k = end + 1
          while (isWs(raw.charCodeAt(k))) k++
          k++ // the ':'
          while (isWs(raw.charCodeAt(k))) k++
          // The value is a string (the route's schema says so): replace it up to its closing quote.
          if (raw.charCodeAt(k) !== QUOTE) throw new SyntaxError(`${key} is not a string`)
          const valueEnd = stringEnd(raw, k)
          out += raw.slice(copied, k) + value
          copied = valueEnd + 1
          i = valueEnd + 1
          continue
        }
      }
      i = end + 1
      continue
    }
    if (c === OPEN_BRACE || c === OPEN_BRACKET) {
      depth++
    } else if (c === CLOSE_BRACE || c === CLOSE_BRACKET) {
      if (--depth === 0) break
    } else if (c === COMMA && depth === 1) {
      expectKey = true
    }
    i++
  }
  return out + raw.slice(copied)
}

/** Whether the key string raw[start..end] (quotes included) decodes to `key`. */
function isKey (raw: string, start: number, end: number, key: string): boolean {
  const escaped = raw.indexOf('\\', start + 1)
  if (escaped !== -1 && escaped < end) return JSON.parse(raw.slice(start, end + 1)) === key
  return end - start - 1 === key.length && raw.startsWith(key, start + 1)
}
