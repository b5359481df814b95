/**
 * What the gateway knows of its Ollama upstreams without asking them on a request's path: a
 * background poll of each distinct server's `/api/ps`, `/api/tags` and `/api/version`, every
 * `intervalMs`, one fetch in flight per server, each bounded by `timeoutMs`, never following a
 * redirect. The catalogue routes, the scheduler's warm preference and the console all read it.
 *
 * API (all synchronous reads of the last poll):
 *  - `snapshot(assignmentId)` / `snapshots()`: per assignment, `health` (`up`: its server answered
 *    the last poll; `unreachable`: the last poll failed; `unknown`: not polled yet), the models loaded
 *    there and `polledAt` (ms since the epoch of the last answer). Only llm (Ollama) assignments
 *    are polled: `snapshot()` of any other is undefined.
 *  - `isLoaded(assignment, model)`: the model is resident on the assignment's server, from the
 *    last `/api/ps` and the gateway's own traffic since. False when unknown: no preference, never "down".
 *  - `preferredAmong(candidates, model)`: a few of the candidates where the model is loaded, for
 *    the scheduler to try first: cached per candidate list until what is loaded changes, and a
 *    different few each call, so its cost does not grow with the fleet.
 *  - `noteServed(assignment, model)` / `noteUnloaded(assignment, model)`: the gateway's own
 *    traffic says the model was just served (so it is loaded) or unloaded there.
 *  - `tags()`, `ps()`, `version()`: the fleet's catalogue (see `upstream-catalog.ts`).
 * No Fastify here.
 */
import http from 'node:http'
import type { Assignment } from './inventory.js'
import { modelKey } from './model-name.js'
import { gatewayVersion } from '../config/package-root.js'
import { fetchJson, fleetPs, fleetTags, validEntries, type OllamaModelEntry, type ServerListing } from './upstream-catalog.js'

export type UpstreamHealth = 'up' | 'unreachable' | 'unknown'

export interface UpstreamSnapshot {
  assignmentId: string
  assignment: string
  url: string
  health: UpstreamHealth
  /** Model keys (lower case, no `:latest`) resident on the assignment's server. */
  loaded: string[]
  /** When the server last answered a poll (ms since the epoch). */
  polledAt?: number
  /** Why the last poll failed (for logs and the console; never shown on an open route). */
  error?: string
}

export interface UpstreamPollerOptions {
  /** The llm assignments to poll, read at each round (the inventory may change). */
  assignments: () => Assignment[]
  intervalMs: number
  /** Bound of each fetch (default 2500 ms). */
  timeoutMs?: number
  log?: { warn: (obj: object, msg: string) => void, info: (obj: object, msg: string) => void }
}

/** What one server said at its last poll. */
interface ServerState {
  url: string
  health: UpstreamHealth
  tags: OllamaModelEntry[]
  ps: OllamaModelEntry[]
  version?: string
  /** Resident model keys: the last `/api/ps`, then the gateway's own traffic. */
  loaded: Set<string>
  /** When the gateway last served each model here (so a poll read before it does not forget it). */
  servedAt: Map<string, number>
  polledAt?: number
  error?: string
  inFlight?: Promise<void>
}

const DEFAULT_TIMEOUT_MS = 2500

/**
 * Warm candidates offered to the scheduler per request. It tries them first, one by one, and a
 * busy one costs it a look: a few are enough for a warm one to be free when any is, and the
 * scheduler then takes any free one.
 */
export const PREFERRED_MAX = 4

/** Says on the wire (and in an upstream's logs) that this is the gateway's poll, not a client's request. */
const POLL_HEADERS = { 'user-agent': `ai-maestro-proxy/${gatewayVersion} upstream-poll` }

export class UpstreamPoller {
  private readonly servers = new Map<string, ServerState>()
  private timer?: NodeJS.Timeout
  private closed = false
  private readonly abort = new AbortController()
  /**
   * One kept connection per server between polls (a poll is three requests in a row): a new
   * connection per request cost more than the requests, every round, on every server.
   */
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: 1 })
  private readonly timeoutMs: number
  /** Bumped whenever a server's set of loaded models changes: the warm lists below are then stale. */
  private loadedVersion = 0
  private readonly warm = new WeakMap<readonly Assignment[], { version: number, model: string, ids: string[], next: number }>()

  constructor (private readonly opts: UpstreamPollerOptions) {
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS
  }

  /** Polls once (waiting at most `timeoutMs` for it), then every `intervalMs`. */
  async start (): Promise<void> {
    const first = this.pollAll()
    let timer: NodeJS.Timeout | undefined
    await Promise.race([first, new Promise((resolve) => { timer = setTimeout(resolve, this.timeoutMs) })])
    clearTimeout(timer)
    this.timer = setInterval(() => { void this.pollAll() }, this.opts.intervalMs)
    this.timer.unref()
  }

  close (): void {
    this.closed = true
    if (this.timer != null) clearInterval(this.timer)
    this.abort.abort()
    this.agent.destroy()
  }

  /** One round over every server; a server whose previous poll is still running is not asked again. */
  async pollAll (): Promise<void> {
    const urls = new Set(this.opts.assignments().map((a) => a.url))
    for (const url of this.servers.keys()) if (!urls.has(url)) this.servers.delete(url)
    await Promise.all([...urls].map(async (url) => await this.poll(url)))
  }

  private async poll (url: string): Promise<void> {
    let state = this.servers.get(url)
    if (state == null) {
      state = { url, health: 'unknown', tags: [], ps: [], loaded: new Set(), servedAt: new Map() }
      this.servers.set(url, state)
    }
    if (state.inFlight != null) return await state.inFlight
    const s = state
    s.inFlight = this.read(s).finally(() => { s.inFlight = undefined })
    return await s.inFlight
  }

  private async read (s: ServerState): Promise<void> {
    const startedAt = Date.now()
    try {
      // One after the other: one fetch in flight per server.
      const ps = validEntries((await this.fetchJson(s.url + '/api/ps'))?.models)
      const tags = validEntries((await this.fetchJson(s.url + '/api/tags'))?.models)
      const version = (await this.fetchJson(s.url + '/api/version'))?.version
      if (this.closed) return
      const wasUp = s.health === 'up'
      s.ps = ps
      s.tags = tags
      s.version = typeof version === 'string' && version.length <= 100 ? version : undefined
      // What was served since this poll began is loaded whatever the list (read before it) says.
      const servedSince = [...s.servedAt].filter(([, at]) => at >= startedAt).map(([k]) => k)
      s.servedAt.clear()
      this.setLoaded(s, new Set([...ps.map((e) => modelKey(e.name)), ...servedSince]))
      s.health = 'up'
      s.polledAt = Date.now()
      s.error = undefined
      if (!wasUp) this.opts.log?.info({ upstream: s.url }, 'upstream answers its poll')
    } catch (err) {
      if (this.closed) return
      // Unknown, not down: no warm preference, and the catalogue keeps its last lists.
      if (s.health !== 'unreachable') this.opts.log?.warn({ upstream: s.url, err }, 'upstream poll failed')
      s.health = 'unreachable'
      s.error = (err as Error).message
      this.setLoaded(s, new Set())
    }
  }

  private setLoaded (s: ServerState, loaded: Set<string>): void {
    if (loaded.size !== s.loaded.size || [...loaded].some((k) => !s.loaded.has(k))) this.loadedVersion++
    s.loaded = loaded
  }

  private async fetchJson (url: string): Promise<any> {
    return await fetchJson(url, { timeoutMs: this.timeoutMs, signal: this.abort.signal, headers: POLL_HEADERS, agent: this.agent })
  }

  private serverOf (assignmentId: string): { assignment: Assignment, state?: ServerState } | undefined {
    const assignment = this.opts.assignments().find((a) => a.id === assignmentId)
    return assignment == null ? undefined : { assignment, state: this.servers.get(assignment.url) }
  }

  snapshot (assignmentId: string): UpstreamSnapshot | undefined {
    const found = this.serverOf(assignmentId)
    return found == null ? undefined : toSnapshot(found.assignment, found.state)
  }

  snapshots (): UpstreamSnapshot[] {
    return this.opts.assignments().map((a) => toSnapshot(a, this.servers.get(a.url)))
  }

  isLoaded (assignment: Pick<Assignment, 'url'>, model: string): boolean {
    return this.servers.get(assignment.url)?.loaded.has(modelKey(model)) ?? false
  }

  /** Up to PREFERRED_MAX ids of `candidates` (one array per model, as the inventory hands it out) where `model` is loaded. */
  preferredAmong (candidates: readonly Assignment[], model: string): string[] {
    let w = this.warm.get(candidates)
    if (w == null || w.version !== this.loadedVersion || w.model !== model) {
      w = { version: this.loadedVersion, model, ids: candidates.filter((a) => this.isLoaded(a, model)).map((a) => a.id), next: 0 }
      this.warm.set(candidates, w)
    }
    if (w.ids.length <= PREFERRED_MAX) return w.ids
    const out: string[] = []
    for (let i = 0; i < PREFERRED_MAX; i++) out.push(w.ids[(w.next + i) % w.ids.length])
    w.next = (w.next + PREFERRED_MAX) % w.ids.length
    return out
  }

  noteServed (assignment: Pick<Assignment, 'url'>, model: string): void {
    const state = this.servers.get(assignment.url)
    if (state == null) return
    const key = modelKey(model)
    state.servedAt.set(key, Date.now())
    if (state.loaded.has(key)) return
    state.loaded.add(key)
    this.loadedVersion++
  }

  noteUnloaded (assignment: Pick<Assignment, 'url'>, model: string): void {
    const state = this.servers.get(assignment.url)
    if (state == null) return
    const key = modelKey(model)
    if (state.loaded.delete(key)) this.loadedVersion++
    state.servedAt.delete(key)
    state.ps = state.ps.filter((e) => modelKey(e.name) !== key)
  }

  private listings (pick: (s: ServerState) => OllamaModelEntry[]): ServerListing[] {
    const out: ServerListing[] = []
    for (const s of this.servers.values()) {
      // An unreachable server keeps its last lists: one failed poll does not empty the catalogue.
      if (s.polledAt != null) out.push({ url: s.url, models: pick(s) })
    }
    return out
  }

  /** `/api/tags` of the fleet. */
  tags (): OllamaModelEntry[] {
    return fleetTags(this.opts.assignments(), this.listings((s) => s.tags))
  }

  /** `/api/ps` of the fleet: each model once, with the assignments whose server has it loaded. */
  ps (): OllamaModelEntry[] {
    return fleetPs(this.opts.assignments(), this.listings((s) => s.ps))
  }

  /** The version of an upstream that answers, if any does. */
  version (): string | undefined {
    for (const a of this.opts.assignments()) {
      const s = this.servers.get(a.url)
      if (s?.health === 'up' && s.version != null) return s.version
    }
    return undefined
  }
}

function toSnapshot (a: Assignment, s: ServerState | undefined): UpstreamSnapshot {
  return {
    assignmentId: a.id,
    assignment: a.name,
    url: a.url,
    health: s?.health ?? 'unknown',
    loaded: s == null ? [] : [...s.loaded],
    polledAt: s?.polledAt,
    error: s?.error
  }
}
