/**
 * Which browser origins may send the gateway requests that change something or use a GPU
 * (CONTRACT 18), like Ollama's OLLAMA_ORIGINS. A page on any site can POST to a gateway on
 * localhost or the LAN without a CORS preflight (a `text/plain` body); its `Origin` header is what
 * gives it away.
 *
 * Names are compared as text and never resolved: a name that resolves to loopback (DNS rebinding,
 * `http://localtest.me`) is not a loopback origin. Every match here runs in time linear in the
 * origin's length (no regular expression is built from configuration).
 */

/** Host names that are this machine by definition, on any scheme and port. */
const LOOPBACK_HOSTS = new Set(['localhost', '127.0.0.1', '[::1]', '0.0.0.0'])

/** Desktop apps, local files and editor webviews, as Ollama allows them by default. */
const DEFAULT_PATTERNS = ['app://*', 'file://*', 'tauri://*', 'vscode-webview://*']

/** `scheme://host[:port]` of a serialized origin; undefined when the text is not one. */
export interface ParsedOrigin { scheme: string, host: string, port?: string }

const SCHEME = /^[a-z][a-z0-9+.-]*$/
const PORT = /^[0-9]{1,5}$/
const HOST_NAME = /^[a-z0-9._-]+$/
const IPV6_HOST = /^\[[0-9a-f:.]+\]$/

/**
 * Splits an `Origin` value (lower-cased) into its parts. Anything else — `null` (sandboxed frames,
 * some local files), two origins joined by a comma, a path, user info — is not an origin.
 */
export function parseOrigin (origin: string): ParsedOrigin | undefined {
  const sep = origin.indexOf('://')
  if (sep <= 0) return undefined
  const scheme = origin.slice(0, sep)
  const rest = origin.slice(sep + 3)
  if (!SCHEME.test(scheme)) return undefined
  let host: string
  let tail: string
  if (rest.startsWith('[')) {
    const close = rest.indexOf(']')
    if (close < 0) return undefined
    host = rest.slice(0, close + 1)
    tail = rest.slice(close + 1)
    if (!IPV6_HOST.test(host)) return undefined
  } else {
    const colon = rest.indexOf(':')
    host = colon < 0 ? rest : rest.slice(0, colon)
    tail = colon < 0 ? '' : rest.slice(colon)
    // `file://` and `app://` origins may have an empty host.
    if (host !== '' && !HOST_NAME.test(host)) return undefined
  }
  if (tail === '') return { scheme, host }
  if (!tail.startsWith(':') || !PORT.test(tail.slice(1))) return undefined
  return { scheme, host, port: tail.slice(1) }
}

/** A pattern with `*` (any run of characters) as its pieces between the stars. */
type Glob = string[]

/**
 * Whether `text` matches the glob: the first piece is a prefix, the last a suffix, and the ones
 * between are found left to right (taking each at its first place is always right for `*`-only
 * globs, so there is no backtracking).
 */
export function globMatches (pieces: Glob, text: string): boolean {
  if (pieces.length === 1) return text === pieces[0]
  const first = pieces[0]
  const last = pieces[pieces.length - 1]
  if (text.length < first.length + last.length || !text.startsWith(first) || !text.endsWith(last)) return false
  const end = text.length - last.length
  let at = first.length
  for (let i = 1; i < pieces.length - 1; i++) {
    const piece = pieces[i]
    if (piece === '') continue
    const found = text.indexOf(piece, at)
    if (found < 0 || found + piece.length > end) return false
    at = found + piece.length
  }
  return true
}

/** The comma-separated origins of ALLOWED_ORIGINS / OLLAMA_ORIGINS, trimmed, lower-cased, without a trailing `/`. */
export function parseOriginList (value: string | undefined): string[] {
  return (value ?? '').split(',')
    .map((o) => o.trim().toLowerCase())
    .map((o) => o.endsWith('/') ? o.slice(0, -1) : o)
    .filter((o) => o !== '')
}

export class OriginPolicy {
  private readonly globs: Glob[]
  private readonly exact: Set<string>

  /** `extra`: the operator's own origins (ALLOWED_ORIGINS and OLLAMA_ORIGINS), `*` as a wildcard. */
  constructor (extra: string[] = []) {
    const patterns = [...DEFAULT_PATTERNS, ...extra]
    this.exact = new Set(patterns.filter((p) => !p.includes('*')))
    this.globs = patterns.filter((p) => p.includes('*')).map((p) => p.split('*'))
  }

  /** Whether a request carrying this `Origin` may change something or use a GPU without a credential. */
  allows (origin: string): boolean {
    const text = origin.toLowerCase()
    if (this.exact.has(text)) return true
    const parsed = parseOrigin(text)
    // Not an origin at all (`null`, a list): only a pattern naming it exactly, or a bare `*`.
    if (parsed === undefined) return this.globs.some((g) => g.length === 2 && g[0] === '' && g[1] === '')
    if (LOOPBACK_HOSTS.has(parsed.host)) return true
    return this.globs.some((g) => globMatches(g, text))
  }
}
