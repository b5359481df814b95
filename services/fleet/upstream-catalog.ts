import http from 'node:http'
import type { Assignment } from './inventory.js'
import { MODEL_NAME_MAX, modelKey } from './model-name.js'

/** How long an informational request to one upstream may take. */
const INFO_TIMEOUT_MS = 2500

/** The most an informational answer may be: a fleet's model list is a few hundred KB at most. */
const INFO_LIMIT = 16 * 1024 * 1024

export interface FetchJsonOptions {
  timeoutMs?: number
  signal?: AbortSignal
  headers?: Record<string, string>
  /** Connections to keep between calls (the background poll's, one per server). */
  agent?: http.Agent
}

/**
 * GET a small JSON document from an upstream: bounded in time and size, never following a
 * redirect (a 3xx, like any status but 200, is a failure). The error's text names the URL: for
 * logs only. Over a kept connection the server may have closed meanwhile: then asked once again.
 */
export async function fetchJson (url: string, opts: FetchJsonOptions = {}): Promise<any> {
  const timeout = AbortSignal.timeout(opts.timeoutMs ?? INFO_TIMEOUT_MS)
  const signal = opts.signal == null ? timeout : AbortSignal.any([opts.signal, timeout])
  try {
    return await getJson(url, signal, opts)
  } catch (err) {
    if ((err as { reusedSocket?: boolean }).reusedSocket !== true || signal.aborted) throw err
    return await getJson(url, signal, opts)
  }
}

function getJson (url: string, signal: AbortSignal, opts: FetchJsonOptions): Promise<any> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { headers: opts.headers, agent: opts.agent, signal }, (res) => {
      if (res.statusCode !== 200) {
        res.resume()
        reject(new Error(`${url} answered ${res.statusCode ?? '?'}`))
        return
      }
      const chunks: Buffer[] = []
      let size = 0
      res.on('data', (chunk: Buffer) => {
        size += chunk.length
        if (size > INFO_LIMIT) res.destroy(new Error(`${url} answered more than ${INFO_LIMIT} bytes`))
        else chunks.push(chunk)
      })
      res.once('error', reject)
      res.once('end', () => {
        try { resolve(JSON.parse(Buffer.concat(chunks).toString('utf8'))) } catch (err) { reject(err) }
      })
    })
    req.once('error', (err) => {
      // A kept connection closed by the server just as it was used: worth one more try.
      if (req.reusedSocket && (err as NodeJS.ErrnoException).code === 'ECONNRESET') Object.assign(err, { reusedSocket: true })
      reject(err)
    })
  })
}

/** One request per distinct upstream server, however many assignments share it. */
export function distinctUpstreams (assignments: Assignment[]): Assignment[] {
  const seen = new Map<string, Assignment>()
  for (const a of assignments) if (!seen.has(a.url)) seen.set(a.url, a)
  return [...seen.values()]
}

export interface OllamaModelEntry {
  name: string
  model: string
  modified_at?: string
  size?: number
  digest?: string
  details?: Record<string, unknown>
  [key: string]: unknown
}

/** What one upstream server listed at its last answer. */
export interface ServerListing {
  url: string
  models: OllamaModelEntry[]
}

/**
 * The entries of an upstream's `models` list that can be listed: objects with a string `name`
 * (or `model`) of sane length. Anything else is skipped, so one bad entry (or one bad server)
 * never breaks the fleet's list. `name` and `model` are both set, as Open WebUI needs.
 */
export function validEntries (list: unknown): OllamaModelEntry[] {
  if (!Array.isArray(list)) return []
  const out: OllamaModelEntry[] = []
  for (const entry of list) {
    if (entry == null || typeof entry !== 'object' || Array.isArray(entry)) continue
    const e = entry as Record<string, unknown>
    const name = typeof e.name === 'string' ? e.name : e.model
    if (typeof name !== 'string' || name === '' || name.length > MODEL_NAME_MAX) continue
    const model = typeof e.model === 'string' && e.model.length <= MODEL_NAME_MAX ? e.model : name
    const fixed: OllamaModelEntry = { ...e, name, model }
    if (e.details !== undefined && (e.details === null || typeof e.details !== 'object' || Array.isArray(e.details))) fixed.details = {}
    out.push(fixed)
  }
  return out
}

function placeholder (name: string): OllamaModelEntry {
  return { name, model: name, modified_at: new Date(0).toISOString(), size: 0, digest: '', details: {} }
}

/**
 * `/api/tags` for the fleet, from the servers' last listings: every model a (non-`*`) assignment
 * names, described by a server of its that lists it (else a bare entry); and the models served by
 * `*` assignments, each once it is on every `*` server whose list is known (a model pulled on one
 * of two servers is not offered until the other has it too).
 */
export function fleetTags (assignments: Assignment[], listings: ServerListing[]): OllamaModelEntry[] {
  const byUrl = new Map(listings.map((l) => [l.url, l.models]))
  const out = new Map<string, OllamaModelEntry>()
  const described = new Set<string>()
  for (const a of assignments) {
    if (a.modelKey === '*' || described.has(a.modelKey)) continue
    const found = byUrl.get(a.url)?.find((e) => modelKey(e.name) === a.modelKey)
    if (found != null) described.add(a.modelKey)
    out.set(a.modelKey, found ?? out.get(a.modelKey) ?? placeholder(a.model))
  }
  const wildcardServers = distinctUpstreams(assignments.filter((a) => a.modelKey === '*'))
    .map((a) => byUrl.get(a.url)).filter((list) => list != null)
  const [first, ...others] = wildcardServers
  for (const entry of first ?? []) {
    const key = modelKey(entry.name)
    if (out.has(key)) continue
    if (others.every((list) => list.some((e) => modelKey(e.name) === key))) out.set(key, entry)
  }
  return [...out.values()].sort((x, y) => x.name.localeCompare(y.name))
}

/**
 * `/api/ps` for the fleet: each loaded model once, described by the first server listing it, with
 * `servers`: the names of the assignments whose server has it loaded (the gateway's own field).
 */
export function fleetPs (assignments: Assignment[], listings: ServerListing[]): OllamaModelEntry[] {
  const out = new Map<string, OllamaModelEntry & { servers: string[] }>()
  for (const { url, models } of listings) {
    const here = assignments.filter((a) => a.url === url)
    for (const entry of models) {
      const key = modelKey(entry.name)
      // The assignment that serves this model on that server: the one naming it, else its `*` one.
      const by = here.find((a) => a.modelKey === key) ?? here.find((a) => a.modelKey === '*') ?? here[0]
      if (by == null) continue
      const merged = out.get(key)
      if (merged == null) out.set(key, { ...entry, servers: [by.name] })
      else if (!merged.servers.includes(by.name)) merged.servers.push(by.name)
    }
  }
  return [...out.values()]
}
