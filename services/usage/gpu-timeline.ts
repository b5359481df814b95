/**
 * Each GPU's busy intervals over the last hour (CONTRACT 17, the console's Usage view), kept from
 * reads of the lease store's status: the store is shared by every replica, so any replica that
 * reads it sees every replica's leases (a replica's own grants and releases would show its own
 * only). A GPU is busy while it holds at least one lease; held for a waiter is not busy.
 *
 * Between two reads the state is unknown: a lease starts at its `since` (the store says when it
 * was granted) but not before the last read that saw the GPU free, and ends halfway between the
 * last read that saw it and the first that did not. A lease that starts and ends between two reads
 * is not seen, so reads should come about once a second (the console's feed, plugins/fleet-events.ts,
 * reads the status twice a second while a page is open; plugins/gpu-timeline.ts reads it otherwise).
 * What this replica never read (before it started, or while the store could not be read) is
 * unknown, not idle: those minutes answer null.
 */

/** What a read of the lease store's status (`LeaseStore.status`) tells this: the GPUs holding a lease, and since when. */
export interface LeasedGpus {
  gpus: Array<{ gpuId: string, since?: number }>
}

export const TIMELINE_WINDOW_MS = 3_600_000
export const TIMELINE_BUCKET_MS = 60_000

interface GpuBusy {
  /** closed busy intervals, oldest first: [start, end] in ms */
  intervals: Array<[number, number]>
  /** start of the busy interval under way */
  openSince?: number
}

export interface GpuTimelineRead {
  /** start of the first bucket (ms) */
  from: number
  /** the end of the last bucket that counts: the last read (ms) */
  to: number
  bucketMs: number
  /** how many buckets: each GPU's list is this long */
  buckets: number
  /** the start of the oldest stretch of reads still in the window (ms), if any */
  observedSince?: number
  /** per GPU id: the busy share of each bucket, 0 to 1, null where nothing was read */
  busy: Map<string, Array<number | null>>
}

const share = (n: number): number => Math.round(Math.min(1, Math.max(0, n)) * 1000) / 1000

export class GpuTimeline {
  private readonly gpus = new Map<string, GpuBusy>()
  /** reads that covered the window: [first, last] of each unbroken run of reads */
  private readonly observed: Array<[number, number]> = []
  private lastAt?: number

  constructor (private readonly opts: { windowMs?: number, bucketMs?: number, gapMs?: number } = {}) {}

  private get windowMs (): number { return this.opts.windowMs ?? TIMELINE_WINDOW_MS }
  private get bucketMs (): number { return this.opts.bucketMs ?? TIMELINE_BUCKET_MS }
  /** Reads further apart than this leave the time between them unknown (the store could not be read). */
  private get gapMs (): number { return this.opts.gapMs ?? 10_000 }

  /** When the store was last read (ms), if ever: a caller reading on a timer skips a read when another was just made. */
  get lastRead (): number | undefined { return this.lastAt }

  /** One read of the store's status at `at` (ms), for the inventory's GPUs `gpuIds`. */
  observe (at: number, gpuIds: string[], status: LeasedGpus): void {
    const prev = this.lastAt
    if (prev !== undefined && at < prev) return // an older read finishing late: the newer one stands
    const gap = prev !== undefined && at - prev > this.gapMs
    const busyNow = new Map<string, number | undefined>()
    for (const g of status.gpus) busyNow.set(g.gpuId, g.since)
    const known = new Set(gpuIds)
    for (const [id, gpu] of this.gpus) {
      if (!known.has(id)) {
        this.gpus.delete(id)
        continue
      }
      if (gpu.openSince !== undefined && (gap || !busyNow.has(id))) {
        // ended somewhere between the two reads (after a gap: when it was last seen)
        const end = prev === undefined ? at : gap ? prev : (prev + at) / 2
        gpu.intervals.push([gpu.openSince, Math.max(gpu.openSince, end)])
        gpu.openSince = undefined
      }
    }
    for (const id of gpuIds) {
      let gpu = this.gpus.get(id)
      if (gpu === undefined) this.gpus.set(id, gpu = { intervals: [] })
      if (!busyNow.has(id) || gpu.openSince !== undefined) continue
      const since = busyNow.get(id)
      const after = prev === undefined || gap ? -Infinity : prev
      gpu.openSince = Math.min(at, since !== undefined && Number.isFinite(since) ? Math.max(since, after) : prev === undefined || gap ? at : (prev + at) / 2)
    }
    const run = this.observed[this.observed.length - 1]
    if (run !== undefined && !gap && prev !== undefined) run[1] = at
    else this.observed.push([at, at])
    this.lastAt = at
    this.forget(at - this.windowMs - this.bucketMs)
  }

  private forget (before: number): void {
    for (const gpu of this.gpus.values()) {
      let drop = 0
      while (drop < gpu.intervals.length && gpu.intervals[drop][1] < before) drop++
      if (drop > 0) gpu.intervals.splice(0, drop)
    }
    while (this.observed.length > 1 && this.observed[0][1] < before) this.observed.shift()
  }

  /** The busy share per bucket of the window that ends with the bucket holding `now`. */
  read (now: number): GpuTimelineRead {
    const bucketMs = this.bucketMs
    const count = Math.ceil(this.windowMs / bucketMs)
    const from = now - (now % bucketMs) - (count - 1) * bucketMs
    const to = this.lastAt ?? from
    const runs = this.observed.filter(([a, b]) => b > a && b > from)
    // the observed part of each bucket, in ms
    const observed: number[] = new Array<number>(count).fill(0)
    for (const [a, b] of runs) addOverlap(observed, from, bucketMs, a, b)
    const busy = new Map<string, Array<number | null>>()
    for (const [id, gpu] of this.gpus) {
      const ms: number[] = new Array<number>(count).fill(0)
      const intervals = gpu.openSince === undefined ? gpu.intervals : [...gpu.intervals, [gpu.openSince, to] as [number, number]]
      // busy time counts only where it was observed (a lease seen at the first read may be older)
      for (const [a, b] of intervals) for (const [ra, rb] of runs) addOverlap(ms, from, bucketMs, Math.max(a, ra), Math.min(b, rb))
      busy.set(id, ms.map((m, i) => observed[i] > 0 ? share(m / observed[i]) : null))
    }
    return { from, to, bucketMs, buckets: count, observedSince: runs[0]?.[0], busy }
  }
}

/** Adds [a, b)'s overlap with each bucket of `into` (buckets of `bucketMs` from `from`). */
function addOverlap (into: number[], from: number, bucketMs: number, a: number, b: number): void {
  if (!(b > a)) return
  const first = Math.max(0, Math.floor((a - from) / bucketMs))
  const last = Math.min(into.length - 1, Math.floor((b - from) / bucketMs))
  for (let i = first; i <= last; i++) {
    const s = from + i * bucketMs
    const overlap = Math.min(b, s + bucketMs) - Math.max(a, s)
    if (overlap > 0) into[i] += overlap
  }
}
