import { diffSnapshots, type FleetSnapshot } from './fleet-snapshot.js'
import { fleetView, fleetViewKey, OPERATOR, type FleetViewer } from './fleet-view.js'

/** One reader of the stream: takes whole server-sent-event frames. */
export interface FleetReader {
  write: (frame: string) => void
  /** What it may be told (services/fleet/fleet-view.ts); everything when unset. */
  readonly viewer?: FleetViewer
  /** The hub is closing (the gateway shuts down): finish the stream. */
  end: () => void
}

export interface FleetEventHubOptions {
  /** Reads the shared state (one lease-store status read and friends). */
  build: () => Promise<FleetSnapshot>
  /** How often the state is read while anyone listens. */
  intervalMs?: number
  /** The least time between two reads, however often `poke` is called (default 250 ms). */
  minGapMs?: number
  /** A comment frame this often keeps proxies from closing an idle stream. */
  heartbeatMs?: number
  onError?: (err: unknown) => void
}

export const frame = (event: string, data: unknown): string => `event: ${event}\ndata: ${JSON.stringify(data)}\n\n`

/**
 * One source of fleet events per gateway instance, however many pages are open: while anyone
 * listens it reads the state every `intervalMs` (sooner after `poke`, never twice within
 * `minGapMs`), diffs it with the last read and writes the same frame to every reader of the same
 * view (the operator's, the public one, each key's), each view diffed with its own last state. A
 * new reader gets a whole snapshot first. Nobody listening: no reads at all.
 */
export class FleetEventHub {
  private readonly readers = new Set<FleetReader>()
  /** Readers that still need a whole snapshot (new ones, and everyone after an outage). */
  private readonly needSnapshot = new Set<FleetReader>()
  private current?: FleetSnapshot
  private timer?: NodeJS.Timeout
  private heartbeat?: NodeJS.Timeout
  private dueAt = Infinity
  private lastStart = -Infinity
  private building = false
  private failing = false
  private closed = false
  private readonly intervalMs: number
  private readonly minGapMs: number
  private readonly heartbeatMs: number
  /** Told after every read of the state (a metric counts them). */
  onBuild?: () => void

  constructor (private readonly opts: FleetEventHubOptions) {
    this.intervalMs = opts.intervalMs ?? 500
    this.minGapMs = opts.minGapMs ?? 250
    this.heartbeatMs = opts.heartbeatMs ?? 15_000
  }

  get size (): number {
    return this.readers.size
  }

  /** Adds a reader; it hears a snapshot as soon as one is read. Returns the way to leave. */
  subscribe (reader: FleetReader): () => void {
    if (this.closed) return () => {}
    this.readers.add(reader)
    this.needSnapshot.add(reader)
    if (this.heartbeat == null) {
      this.heartbeat = setInterval(() => { this.broadcast(':\n\n') }, this.heartbeatMs)
      this.heartbeat.unref()
    }
    this.schedule(0)
    return () => { this.unsubscribe(reader) }
  }

  private unsubscribe (reader: FleetReader): void {
    this.readers.delete(reader)
    this.needSnapshot.delete(reader)
    if (this.readers.size > 0) return
    clearTimeout(this.timer)
    clearInterval(this.heartbeat)
    this.timer = undefined
    this.heartbeat = undefined
    this.dueAt = Infinity
    // Whatever is read next time starts from scratch: changes meanwhile went unseen.
    this.current = undefined
  }

  /** Something changed (a lease here, a notice from another replica): read the state soon. */
  poke (): void {
    if (this.readers.size > 0) this.schedule(0)
  }

  private schedule (delayMs: number): void {
    if (this.closed || this.readers.size === 0) return
    const at = Math.max(performance.now() + delayMs, this.lastStart + this.minGapMs)
    if (this.building) {
      // Read again right after the read under way, which may have started before the change.
      this.dueAt = Math.min(this.dueAt, at)
      return
    }
    if (at >= this.dueAt && this.timer != null) return
    clearTimeout(this.timer)
    this.dueAt = at
    this.timer = setTimeout(() => { void this.tick() }, Math.max(0, at - performance.now()))
    this.timer.unref()
  }

  private async tick (): Promise<void> {
    this.timer = undefined
    this.dueAt = Infinity
    if (this.closed || this.readers.size === 0) return
    this.building = true
    this.lastStart = performance.now()
    try {
      const next = await this.opts.build()
      this.onBuild?.()
      this.publish(next)
    } catch (err) {
      this.opts.onError?.(err)
      if (!this.failing) this.broadcast(frame('unavailable', { error: 'fleet state unavailable' }))
      this.failing = true
      this.current = undefined
      for (const r of this.readers) this.needSnapshot.add(r)
    } finally {
      this.building = false
    }
    const pending = this.dueAt
    this.dueAt = Infinity
    this.schedule(pending === Infinity ? this.intervalMs : Math.max(0, pending - performance.now()))
  }

  private publish (next: FleetSnapshot): void {
    const prev = this.current
    this.current = next
    this.failing = false
    // Each view's frames are made once, whatever the number of its readers.
    const views = new Map<string, ViewFrames>()
    for (const reader of [...this.readers]) {
      const viewer = reader.viewer ?? OPERATOR
      const key = fleetViewKey(viewer)
      let frames = views.get(key)
      if (frames === undefined) views.set(key, frames = { view: fleetView(next, viewer) })
      if (this.needSnapshot.has(reader) || prev == null) {
        this.needSnapshot.delete(reader)
        frames.snapshot ??= frame('snapshot', frames.view)
        reader.write(frames.snapshot)
        continue
      }
      if (frames.change === undefined) {
        const change = diffSnapshots(fleetView(prev, viewer), frames.view)
        frames.change = change == null ? null : frame('change', change)
      }
      if (frames.change != null) reader.write(frames.change)
    }
  }

  private broadcast (text: string): void {
    for (const reader of [...this.readers]) reader.write(text)
  }

  close (): void {
    this.closed = true
    clearTimeout(this.timer)
    clearInterval(this.heartbeat)
    for (const reader of this.readers) reader.end()
    this.readers.clear()
    this.needSnapshot.clear()
  }
}

/** One view's frames of one read: made when its first reader needs them. */
interface ViewFrames {
  view: FleetSnapshot
  snapshot?: string
  /** null: nothing changed in this view */
  change?: string | null
}

/** What an event-stream reader writes to: an HTTP response, or any Node writable. */
export interface FrameSink {
  write: (chunk: string) => boolean
  readonly writableLength: number
  destroy: () => void
  end: () => void
}

/**
 * A reader that writes frames to a socket and is cut off, not buffered for ever, when it does not
 * keep up: when a frame comes while more than `maxBufferedBytes` still wait unsent, the connection
 * is destroyed instead (the page reconnects and starts from a snapshot). The allowance grows to
 * the largest frame the reader was sent, so a fleet whose snapshot is larger than the bound can
 * still be read: a reader is kept while it is behind by less than one whole snapshot. So one
 * stream holds at most max(bound, largest frame) plus one frame. Sizes are counted in characters
 * (the frames are mostly ASCII JSON).
 */
export class StreamReader implements FleetReader {
  dropped = false
  private largestFrame = 0

  constructor (
    private readonly sink: FrameSink,
    private readonly maxBufferedBytes: number,
    private readonly onDrop: () => void,
    readonly viewer?: FleetViewer
  ) {}

  write (text: string): void {
    if (this.dropped) return
    this.largestFrame = Math.max(this.largestFrame, text.length)
    if (this.sink.writableLength > Math.max(this.maxBufferedBytes, this.largestFrame)) {
      this.dropped = true
      this.sink.destroy()
      this.onDrop()
      return
    }
    this.sink.write(text)
  }

  end (): void {
    if (!this.dropped) this.sink.end()
  }
}

/**
 * Open event streams, counted so that neither all of them together nor one client can hold more
 * than its share of connections (and their buffers): `max` in all, `perClient` per client.
 */
export class EventStreamLimit {
  private open = 0
  private readonly byClient = new Map<string, number>()

  constructor (private readonly max: number, private readonly perClient: number) {}

  /** A place for one more stream of `client`, freed by calling what it returns (once is enough), or why there is none. */
  take (client: string): { release: () => void } | { refused: string } {
    const mine = this.byClient.get(client) ?? 0
    if (this.open >= this.max) return { refused: `too many event streams open on this gateway (${this.max}); try again later` }
    if (mine >= this.perClient) return { refused: `too many event streams open for this client (${this.perClient}); close one first` }
    this.open++
    this.byClient.set(client, mine + 1)
    let released = false
    return {
      release: () => {
        if (released) return
        released = true
        this.open--
        const left = (this.byClient.get(client) ?? 1) - 1
        if (left > 0) this.byClient.set(client, left)
        else this.byClient.delete(client)
      }
    }
  }
}
