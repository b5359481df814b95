import { performance } from 'node:perf_hooks'

export interface GpuOverlap {
  gpuId: string
  /** labels of every work holding the GPU at that moment, the newcomer last */
  holders: string[]
  at: number
}

export interface GpuEvent {
  type: 'start' | 'end'
  gpuIds: string[]
  label: string
  /** the model the work was for, when the simulator said */
  model?: string
  /** performance.now() in ms */
  at: number
}

interface Work {
  gpuIds: string[]
  label: string
  model?: string
}

/** Works that ran on one GPU at the same moment (recorded each time a work joins others). */
export interface GpuTogether {
  gpuId: string
  /** the models of every work holding the GPU at that moment, the newcomer last */
  models: string[]
  at: number
}

export interface EnterOptions {
  /** the model the work is for */
  model?: string
  /**
   * How many works the GPU's server runs at once (Ollama's OLLAMA_NUM_PARALLEL; default 1): one
   * more entering is an overlap. The server queues what is beyond it; the gateway must not rely on that.
   */
  capacity?: number
}

/**
 * Records which GPUs are working, shared by any number of simulators.
 *
 * A simulator calls `enter` when a request that does model work has arrived (headers and body
 * received) and `exit` once when its response has ended or its socket closed. A GPU entered while
 * as many works as its server runs at once (`capacity`, default 1) is an overlap: the gateway sent
 * a GPU more than it may hold.
 */
export class GpuRecorder {
  readonly overlaps: GpuOverlap[] = []
  readonly events: GpuEvent[] = []
  /** each time a work joined others on a GPU (within capacity or not): which models ran together */
  readonly together: GpuTogether[] = []
  /** highest number of works in progress at once, across all GPUs */
  maxConcurrent = 0
  /** highest number of works in progress at once, per GPU */
  readonly peakByGpu = new Map<string, number>()

  private nextId = 1
  private readonly works = new Map<number, Work>()
  private readonly holders = new Map<string, Set<number>>()
  private idleWaiters: Array<() => void> = []

  enter (gpuIds: string[], label: string, opts: EnterOptions = {}): number {
    const at = performance.now()
    const id = this.nextId++
    const ids = [...new Set(gpuIds)]
    const { model } = opts
    const capacity = Math.max(1, opts.capacity ?? 1)
    for (const gpuId of ids) {
      let set = this.holders.get(gpuId)
      if (set === undefined) {
        set = new Set()
        this.holders.set(gpuId, set)
      }
      if (set.size > 0) {
        const others = [...set].map(w => ({ id: w, work: this.works.get(w) }))
        if (set.size >= capacity) this.overlaps.push({ gpuId, holders: [...others.map(o => o.work?.label ?? `#${o.id}`), label], at })
        this.together.push({ gpuId, models: [...others.map(o => o.work?.model ?? '?'), model ?? '?'], at })
      }
      set.add(id)
      if (set.size > (this.peakByGpu.get(gpuId) ?? 0)) this.peakByGpu.set(gpuId, set.size)
    }
    this.works.set(id, { gpuIds: ids, label, model })
    this.events.push({ type: 'start', gpuIds: ids, label, model, at })
    if (this.works.size > this.maxConcurrent) this.maxConcurrent = this.works.size
    return id
  }

  /** Ends a work. Unknown or already ended ids are ignored, so calling it twice is harmless. */
  exit (workId: number): void {
    const at = performance.now()
    const work = this.works.get(workId)
    if (work === undefined) return
    this.works.delete(workId)
    for (const gpuId of work.gpuIds) {
      const set = this.holders.get(gpuId)
      if (set === undefined) continue
      set.delete(workId)
      if (set.size === 0) this.holders.delete(gpuId)
    }
    this.events.push({ type: 'end', gpuIds: work.gpuIds, label: work.label, model: work.model, at })
    if (this.works.size === 0) {
      const waiters = this.idleWaiters
      this.idleWaiters = []
      for (const w of waiters) w()
    }
  }

  /** GPU ids busy right now. */
  busy (): string[] {
    return [...this.holders.keys()]
  }

  /** Highest number of works held at once on that GPU since the last reset. */
  peak (gpuId: string): number {
    return this.peakByGpu.get(gpuId) ?? 0
  }

  /** Number of works in progress right now. */
  active (): number {
    return this.works.size
  }

  /** Resolves once no work is in progress (exits are recorded when sockets close, a tick after a client sees the end). */
  async whenIdle (timeoutMs = 5000): Promise<void> {
    if (this.works.size === 0) return
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.idleWaiters = this.idleWaiters.filter(w => w !== done)
        reject(new Error(`GpuRecorder: still busy after ${timeoutMs} ms: ${[...this.works.values()].map(w => w.label).join(', ')}`))
      }, timeoutMs)
      const done = (): void => {
        clearTimeout(timer)
        resolve()
      }
      this.idleWaiters.push(done)
    })
  }

  /**
   * Milliseconds between each moment the GPU became free (its last holder ended) and the next
   * start on it.
   */
  idleGaps (gpuId: string): number[] {
    const gaps: number[] = []
    let count = 0
    let lastEnd: number | null = null
    for (const e of this.events) {
      if (!e.gpuIds.includes(gpuId)) continue
      if (e.type === 'start') {
        if (count === 0 && lastEnd !== null) gaps.push(e.at - lastEnd)
        lastEnd = null
        count++
      } else {
        count = Math.max(0, count - 1)
        if (count === 0) lastEnd = e.at
      }
    }
    return gaps
  }

  /**
   * Forgets the history (events, overlaps, maxConcurrent). Works still in progress stay held, so an
   * overlap with them is still detected; their 'end' will be recorded when they finish.
   */
  reset (): void {
    this.overlaps.length = 0
    this.events.length = 0
    this.together.length = 0
    this.maxConcurrent = this.works.size
    this.peakByGpu.clear()
    for (const [gpuId, set] of this.holders) this.peakByGpu.set(gpuId, set.size)
  }
}
