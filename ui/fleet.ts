/*
 * What `GET /gpu/events` sends (the server's services/fleet/fleet-snapshot.ts; the page is compiled on
 * its own, for the browser, so it states the shapes it reads). Without the admin token the feed
 * leaves out addresses, loaded models, the admin settings and others' requests (services/fleet/fleet-view.ts).
 */

export interface Slots { used: number, capacity: number }
export interface Computer { id: string, name: string, ip?: string, gpuIds: string[] }
export interface Gpu {
  id: string
  name: string
  computerId: string
  vramGb: number
  state: 'idle' | 'leased' | 'held'
  model?: string
  assignmentId?: string
  assignment?: string
  purpose?: string
  since?: number
  slots?: Slots
}
export interface Assignment {
  id: string
  name: string
  model: string
  kind: string
  address?: string
  gpuIds: string[]
  slots: Slots
  health?: 'up' | 'cooling' | 'unreachable' | 'unknown'
  loaded?: string[]
  drained?: boolean
}
export interface Queue { id: string, kind: string, model: string, depth: number, oldestSince?: number }
export interface Replica { id: string, host?: string, pid?: number }
export interface RecentRequest {
  at: string
  route?: string
  model: string
  client?: string
  status: number
  queueMs?: number
  upstreamMs?: number
  assignment?: string
}

export interface Fleet {
  at: number
  replica: string
  store?: 'redis' | 'memory'
  admin: { resources: string[], token?: boolean }
  computers: Computer[]
  gpus: Gpu[]
  assignments: Assignment[]
  queues: Queue[]
  replicas: Replica[]
  /** absent: this reader may not see them (no key, no admin token) */
  recent?: RecentRequest[]
  recentLimit?: number
}

export const SECTIONS = ['computers', 'gpus', 'assignments', 'queues', 'replicas'] as const
export type Section = typeof SECTIONS[number]

export interface FleetChange {
  at: number
  set: Partial<Record<Section, Array<{ id: string }>>>
  remove: Partial<Record<Section, string[]>>
  recentAdded?: RecentRequest[]
  recent?: RecentRequest[]
}

/** The fleet after `change`, and which sections it touched. */
export function applyChange (fleet: Fleet, change: FleetChange): { fleet: Fleet, touched: Set<Section | 'recent'> } {
  const next: Fleet = { ...fleet, at: change.at }
  const touched = new Set<Section | 'recent'>()
  for (const section of SECTIONS) {
    const set = change.set[section]
    const remove = change.remove[section]
    if (set == null && remove == null) continue
    touched.add(section)
    const records = new Map<string, { id: string }>((fleet[section] as Array<{ id: string }>).map((r) => [r.id, r]))
    for (const id of remove ?? []) records.delete(id)
    for (const r of set ?? []) records.set(r.id, r)
    ;(next as unknown as Record<Section, unknown>)[section] = [...records.values()]
  }
  if (change.recent != null) {
    next.recent = change.recent
    touched.add('recent')
  } else if (change.recentAdded != null) {
    next.recent = [...change.recentAdded, ...fleet.recent ?? []].slice(0, fleet.recentLimit)
    touched.add('recent')
  }
  return { fleet: next, touched }
}
