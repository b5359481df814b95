/**
 * How long a new request for a model would wait for a lease, as the fallback choice needs it
 * (CONTRACT 17, `FALLBACK_AFTER_MS`). A simple estimate: 0 while a candidate has a free slot;
 * otherwise (waiters ahead + 1) × the model's service time ÷ its candidates' slots. The service
 * time is learned on this replica (a moving average of how long its leases of the model were
 * held); before any has ended, the age of the oldest lease running on the model's servers (what
 * it has taken so far: a lower bound). No Fastify here.
 */
import type { Assignment } from '../fleet/inventory.js'
import type { StoreStatus } from './lease-store.js'

/** Weight of the newest hold time in the moving average. */
const EWMA_WEIGHT = 0.3
/** Queues remembered (the names come from requests of known models only, but bounded all the same). */
const QUEUES_MAX = 1000

/** Each queue's (model's) service time: how long its leases are held, as seen on this replica. */
export class ServiceTimes {
  private readonly ms = new Map<string, number>()

  note (queue: string, heldMs: number): void {
    if (!(heldMs >= 0)) return
    const was = this.ms.get(queue)
    if (was === undefined && this.ms.size >= QUEUES_MAX) this.ms.clear()
    this.ms.set(queue, was === undefined ? heldMs : was + EWMA_WEIGHT * (heldMs - was))
  }

  of (queue: string): number | undefined {
    return this.ms.get(queue)
  }
}

/** The expected wait, in ms, of one more request for `queue` among `candidates`, from the store's status of their GPUs. */
export function expectedWaitMs (status: StoreStatus, candidates: readonly Assignment[], queue: string, serviceMs: number | undefined, now = Date.now()): number {
  const waiting = status.queues[queue] ?? 0
  let slots = 0
  let free = false
  let oldest: number | undefined
  for (const a of candidates) {
    slots += a.capacity
    const gpus = status.gpus.filter((g) => a.gpuIds.includes(g.gpuId))
    const used = gpus.reduce((n, g) => Math.max(n, g.slotsUsed), 0)
    if (used < a.capacity) free = true
    for (const g of gpus) if (g.since !== undefined && g.slotsUsed > 0) oldest = Math.min(oldest ?? g.since, g.since)
  }
  if (free && waiting === 0) return 0
  const service = serviceMs ?? (oldest === undefined ? 0 : Math.max(0, now - oldest))
  return (waiting + 1) * service / Math.max(1, slots)
}
