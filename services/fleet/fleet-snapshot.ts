import type { InventorySnapshot } from './inventory.js'
import { queueLabel, type StoreStatus } from '../leases/lease-store.js'
import type { RecentRequest } from '../clients/recent-requests.js'

/*
 * What the console shows, as `GET /gpu/events` sends it: one snapshot, then changes. Times are
 * epoch milliseconds (the page counts "since" itself, so a lease that goes on sends nothing).
 * Fields marked optional are filled when the part of the gateway that knows them is present, and
 * when the reader may see them (services/fleet/fleet-view.ts: no addresses, loaded models, admin settings
 * or other clients' requests without the admin token).
 */

export type GpuState = 'idle' | 'leased' | 'held'
export type UpstreamHealthState = 'up' | 'cooling' | 'unreachable' | 'unknown'

export interface Slots { used: number, capacity: number }

export interface ComputerView {
  id: string
  name: string
  /** operator only */
  ip?: string
  gpuIds: string[]
}

export interface GpuView {
  id: string
  name: string
  computerId: string
  vramGb: number
  /** held: kept free for a request that has waited past STARVATION_MS */
  state: GpuState
  /** the fields below only while leased */
  model?: string
  assignmentId?: string
  assignment?: string
  purpose?: string
  since?: number
  /** the leasing assignment's slots */
  slots?: Slots
}

export interface AssignmentView {
  id: string
  name: string
  model: string
  kind: string
  /** `ip:port` of the upstream server (operator only) */
  address?: string
  gpuIds: string[]
  slots: Slots
  health?: UpstreamHealthState
  /** models the upstream has in memory (its `/api/ps`; operator only) */
  loaded?: string[]
  drained?: boolean
}

export interface QueueView {
  /** `<kind>:<model key>` */
  id: string
  kind: string
  model: string
  depth: number
  /** arrival time of the oldest live waiter (absent when the store could not tell) */
  oldestSince?: number
}

/** A gateway replica alive now (it heart-beat within the last few seconds). */
export interface ReplicaView { id: string, host?: string, pid?: number }

export interface FleetSnapshot {
  at: number
  /** the replica that built it */
  replica: string
  /** operator only */
  store?: 'redis' | 'memory'
  /** the admin API's record kinds this gateway has (`computers`, `api-keys`...), and (operator only) whether it wants a token */
  admin: { resources: string[], token?: boolean }
  computers: ComputerView[]
  gpus: GpuView[]
  assignments: AssignmentView[]
  queues: QueueView[]
  replicas: ReplicaView[]
  /** newest first, at most `recentLimit`: the operator sees all, a key its own among them, others none (absent) */
  recent?: RecentRequest[]
  recentLimit?: number
}

export const KEYED_SECTIONS = ['computers', 'gpus', 'assignments', 'queues', 'replicas'] as const
export type KeyedSection = typeof KEYED_SECTIONS[number]

/**
 * What changed between two snapshots: records added or changed (whole), ids gone; the requests
 * that joined the recent list (newest first; the list keeps its newest `recentLimit`), or the whole
 * list when it changed otherwise.
 */
export interface FleetChange {
  at: number
  set: Partial<Record<KeyedSection, Array<{ id: string }>>>
  remove: Partial<Record<KeyedSection, string[]>>
  recentAdded?: RecentRequest[]
  recent?: RecentRequest[]
}

export interface UpstreamHealth {
  health: UpstreamHealthState
  loaded?: string[]
}

export interface FleetInputs {
  inventory: InventorySnapshot
  status: StoreStatus
  recent: RecentRequest[]
  recentLimit: number
  replicas: ReplicaView[]
  replica: string
  store: 'redis' | 'memory'
  admin: FleetSnapshot['admin']
  now: number
  /** per assignment, from the upstream poller when there is one */
  upstreamHealth?: (assignmentId: string) => UpstreamHealth | undefined
}

export function buildFleetSnapshot (inputs: FleetInputs): FleetSnapshot {
  const { inventory, status } = inputs
  const names = new Map(inventory.assignments.map((a) => [a.id, a.name]))
  const leaseByGpu = new Map(status.gpus.map((g) => [g.gpuId, g]))

  // Slots in use per assignment, as the lease store counts them on its GPUs.
  const slotsUsed = new Map<string, number>()
  for (const g of status.gpus) {
    if (g.assignmentId != null) slotsUsed.set(g.assignmentId, Math.max(slotsUsed.get(g.assignmentId) ?? 0, g.slotsUsed))
  }

  const computers = new Map<string, ComputerView>()
  const gpus: GpuView[] = inventory.gpus.map((gpu) => {
    let computer = computers.get(gpu.computerId)
    if (computer === undefined) {
      computers.set(gpu.computerId, computer = { id: gpu.computerId, name: gpu.computerName, ip: gpu.ip, gpuIds: [] })
    }
    computer.gpuIds.push(gpu.id)
    const base = { id: gpu.id, name: gpu.name, computerId: gpu.computerId, vramGb: gpu.vramSize }
    const lease = leaseByGpu.get(gpu.id)
    if (lease == null) return { ...base, state: status.holds[gpu.id] != null ? 'held' : 'idle' }
    return {
      ...base,
      state: 'leased',
      model: lease.model,
      assignmentId: lease.assignmentId,
      assignment: lease.assignmentId == null ? undefined : names.get(lease.assignmentId) ?? lease.assignmentId,
      purpose: lease.purpose,
      since: lease.since,
      slots: { used: lease.slotsUsed, capacity: lease.capacity }
    }
  })

  const assignments: AssignmentView[] = inventory.assignments.map((a) => {
    const health = inputs.upstreamHealth?.(a.id)
    return {
      id: a.id,
      name: a.name,
      model: a.model,
      kind: a.kind,
      address: a.host,
      gpuIds: a.gpuIds,
      slots: { used: slotsUsed.get(a.id) ?? 0, capacity: a.capacity },
      health: health?.health,
      loaded: health?.loaded,
      drained: a.drained === true ? true : undefined
    }
  })

  const queues: QueueView[] = Object.entries(status.queues).map(([queue, depth]) => {
    // `<kind>:<model key>`; the model key may itself hold colons (tags).
    const label = queueLabel(queue)
    const colon = label.indexOf(':')
    return { id: label, kind: label.slice(0, colon), model: label.slice(colon + 1), depth, oldestSince: status.queueSince[queue] }
  }).sort((x, y) => x.id < y.id ? -1 : x.id > y.id ? 1 : 0)

  return {
    at: inputs.now,
    replica: inputs.replica,
    store: inputs.store,
    admin: inputs.admin,
    computers: [...computers.values()],
    gpus,
    assignments,
    queues,
    replicas: inputs.replicas,
    recent: inputs.recent,
    recentLimit: inputs.recentLimit
  }
}

/** JSON with `undefined` fields dropped, which is also what goes on the wire. */
const same = (a: unknown, b: unknown): boolean => JSON.stringify(a) === JSON.stringify(b)

/** The change from `prev` to `next`, or null when the two show the same fleet. */
export function diffSnapshots (prev: FleetSnapshot, next: FleetSnapshot): FleetChange | null {
  const change: FleetChange = { at: next.at, set: {}, remove: {} }
  let changed = false
  for (const section of KEYED_SECTIONS) {
    const before = new Map<string, { id: string }>(prev[section].map((r) => [r.id, r]))
    const set: Array<{ id: string }> = []
    for (const record of next[section]) {
      const old = before.get(record.id)
      before.delete(record.id)
      if (old === undefined || !same(old, record)) set.push(record)
    }
    if (set.length > 0) change.set[section] = set
    if (before.size > 0) change.remove[section] = [...before.keys()]
    changed ||= set.length > 0 || before.size > 0
  }
  if (next.recent != null && !same(prev.recent, next.recent)) {
    // Usually a few requests joined at the head: send those, not the whole list again.
    const before = prev.recent ?? []
    const head = before[0]
    const joined = head === undefined ? next.recent.length : next.recent.findIndex((r) => same(r, head))
    const added = next.recent.slice(0, joined)
    if (prev.recent != null && joined > 0 && same([...added, ...before].slice(0, next.recentLimit), next.recent)) {
      change.recentAdded = added
    } else {
      change.recent = next.recent
    }
    changed = true
  }
  return changed ? change : null
}
