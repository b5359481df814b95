/**
 * The lease store: where GPU leases and the wait queues live. Two implementations share these
 * semantics — Redis (many replicas, Lua scripts) and memory (one process) — and one test suite.
 *
 * Vocabulary:
 * - queue: one per model and kind; waiters are served strictly in arrival order within it.
 * - member: one waiter, `<replicaId>|<n>`; a member whose replica stops heart-beating is dead.
 * - candidate: one assignment the waiter could use, with all its GPU ids; taken all or nothing.
 * - token: one lease, `<member>#<fence>`; the fence grows with every grant.
 */

export interface Candidate {
  assignmentId: string
  gpuIds: string[]
}

/** What a lease is for, kept with it so `/gpu/status` can say who holds what. */
export interface LeaseInfo {
  model: string
  kind: string
  /** 'proxy' leases are renewed by the replica while in flight; 'reservation' ones only by ping. */
  purpose: 'proxy' | 'reservation'
}

export interface Grant {
  member: string
  token: string
  candidateIndex: number
}

export type AttemptResult =
  | { status: 'granted', token: string, candidateIndex: number, epoch: string, grants: Grant[] }
  | { status: 'waiting', position: number, score: number, epoch: string, grants: Grant[] }
  | { status: 'paused', score: number, epoch: string, grants: Grant[] }
  | { status: 'full', epoch: string, grants: Grant[] }

export interface AttemptInput {
  member: string
  queue: string
  candidates: Candidate[]
  info: LeaseInfo
  /** Set when the waiter was queued before and lost its place (store restarted): keeps its order. */
  score?: number
}

export interface HeldLease {
  token: string
  gpuIds: string[]
  assignmentId: string
  queue: string
  info: LeaseInfo
}

export interface GpuLeaseState {
  gpuId: string
  token: string
  assignmentId?: string
  model?: string
  purpose?: string
  since?: number
  expiresAt?: number
}

export interface StoreStatus {
  gpus: GpuLeaseState[]
  /** Live waiters per queue (dead replicas' waiters are pruned on the way). */
  queues: Record<string, number>
  /** GPUs held back for a starving waiter: gpu id → member. */
  holds: Record<string, string>
}

export interface StoreEvents {
  /**
   * One of this replica's waiters was granted a lease: by another replica (a notification), or by
   * a call of this store that served a queue (leave, release, releaseGpus: told before that call
   * resolves, so the next request on freed GPUs starts without waiting for a notification).
   * `attempt` and `sweep` return their grants instead. The same grant may be told twice.
   */
  onGrant: (grant: Grant) => void
  /** Another part of the cluster asked every replica to read the inventory again. */
  onInventoryChanged: () => void
  /** The store came back after being unreachable: re-assert leases, re-enqueue waiters. */
  onReconnect: () => void
}

export interface LeaseStoreOptions {
  ttlMs: number
  queueMax: number
  starvationMs: number
}

export interface LeaseStore {
  readonly kind: 'redis' | 'memory'
  /** The replica this store speaks for; members are `<replicaId>|<n>`. */
  readonly replicaId: string
  /** Subscribe to grants and other cluster events. */
  start: (events: StoreEvents) => Promise<void>
  /** Enqueue (when new) and serve the queue; answers whether this member now holds a lease. */
  attempt: (input: AttemptInput) => Promise<AttemptResult>
  /**
   * Heartbeat and fallback poll in one round trip: keeps this replica alive, serves the given
   * queues, and reports leases already granted to the given members (lost notifications).
   */
  sweep: (queues: string[], members: string[]) => Promise<Grant[]>
  /** Leave the queue; a lease granted meanwhile is released. */
  leave: (queue: string, member: string) => Promise<void>
  /** Release by token (compare-and-delete); grants freed GPUs to waiters. True if it was held. */
  release: (token: string, gpuIds?: string[]) => Promise<boolean>
  /**
   * Release the reservations holding these GPUs (the original API's release by GPU id). A GPU
   * serving a request in flight is left alone: freeing it would hand it to a second request.
   */
  releaseGpus: (gpuIds: string[]) => Promise<number>
  /** Renew in-flight leases, re-creating them if the store lost them; returns tokens now held by others. */
  renew: (leases: HeldLease[]) => Promise<string[]>
  /** Renew one lease only if it still exists (reservations); false when it expired. */
  ping: (token: string) => Promise<HeldLease | undefined>
  /** The lease holding each GPU, for a ping or release by GPU id. */
  tokensOf: (gpuIds: string[]) => Promise<Array<string | undefined>>
  status: (gpuIds: string[]) => Promise<StoreStatus>
  /** Tell every replica to reload the inventory. */
  publishInventoryChanged: () => Promise<void>
  /** False while the store cannot be reached: no lease can be proven free then. */
  available: () => boolean
  close: () => Promise<void>
}

/** GPU and assignment ids become parts of store keys: keep them to a safe alphabet. */
export const SAFE_ID = /^[A-Za-z0-9._-]{1,64}$/

export function assertSafeIds (candidates: Candidate[]): void {
  for (const c of candidates) {
    if (!SAFE_ID.test(c.assignmentId)) throw new Error(`unsafe assignment id ${JSON.stringify(c.assignmentId)}`)
    for (const g of c.gpuIds) {
      if (!SAFE_ID.test(g)) throw new Error(`unsafe gpu id ${JSON.stringify(g)}`)
    }
  }
}

/** Queue names computed so far (one per model in use); emptied when full, as names come from clients. */
const queueNames = new Map<string, string>()
const QUEUE_NAMES_LIMIT = 1000

/** Queue names carry user input (model names): hex keeps them from acting as key separators or globs. */
export function queueName (kind: string, modelKey: string): string {
  const label = `${kind}:${modelKey}`
  let name = queueNames.get(label)
  if (name === undefined) {
    name = Buffer.from(label, 'utf8').toString('hex')
    if (queueNames.size >= QUEUE_NAMES_LIMIT) queueNames.clear()
    queueNames.set(label, name)
  }
  return name
}

export function queueLabel (queue: string): string {
  return Buffer.from(queue, 'hex').toString('utf8')
}

export function memberOf (token: string): string {
  const i = token.lastIndexOf('#')
  return i < 0 ? token : token.slice(0, i)
}
