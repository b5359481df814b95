import type { Assignment } from './inventory.js'
import { modelKey } from './model-name.js'

/** How long an informational request (tags, version, ps) may wait for one upstream. */
const INFO_TIMEOUT_MS = 2500

export async function fetchJson (url: string, timeoutMs = INFO_TIMEOUT_MS): Promise<any> {
  const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) })
  if (!res.ok) throw new Error(`${url} answered ${res.status}`)
  return await res.json()
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

/**
 * `/api/tags` for the fleet: every model with an assignment, described by the upstream that
 * serves it when it answers; a `*` assignment brings its upstream's whole list.
 */
export async function fleetTags (assignments: Assignment[], fetchTags: (a: Assignment) => Promise<OllamaModelEntry[]>): Promise<OllamaModelEntry[]> {
  const upstreams = distinctUpstreams(assignments)
  const lists = new Map<string, OllamaModelEntry[]>()
  await Promise.all(upstreams.map(async (u) => {
    lists.set(u.url, await fetchTags(u).catch(() => []))
  }))
  const out = new Map<string, OllamaModelEntry>()
  for (const a of assignments) {
    const list = lists.get(a.url) ?? []
    if (a.modelKey === '*') {
      for (const entry of list) {
        const key = modelKey(entry.name ?? entry.model)
        if (!out.has(key)) out.set(key, entry)
      }
      continue
    }
    if (out.has(a.modelKey) && out.get(a.modelKey)?.details != null) continue
    const found = list.find((e) => modelKey(e.name ?? e.model ?? '') === a.modelKey)
    out.set(a.modelKey, found ?? {
      name: a.model,
      model: a.model,
      modified_at: new Date(0).toISOString(),
      size: 0,
      digest: '',
      details: {}
    })
  }
  // A `*` list may repeat a named model: the named assignment's entry is the same model.
  return [...out.values()].sort((x, y) => x.name.localeCompare(y.name))
}
