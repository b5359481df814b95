/**
 * A reader of `GET /gpu/events` for tests: parses the server-sent events as they arrive and keeps
 * the fleet as snapshot + changes make it, so a test can wait until it shows something.
 */
export interface FleetState {
  gpus: any[]
  assignments: any[]
  queues: any[]
  replicas: any[]
  computers: any[]
  recent: any[]
  [key: string]: unknown
}

export interface FleetStream {
  response: Response
  /** every event so far, in order */
  events: Array<{ event: string, data: any, at: number }>
  /** the fleet as the events so far describe it (undefined before the first snapshot) */
  state: () => FleetState | undefined
  /** resolves once `ready(state)` holds; rejects after `ms` */
  until: (ready: (state: FleetState) => boolean, ms?: number, what?: string) => Promise<FleetState>
  /** raw text received, comments and `retry:` included */
  text: () => string
  close: () => void
}

const SECTIONS = ['computers', 'gpus', 'assignments', 'queues', 'replicas']

export async function openFleetStream (url: string, headers: Record<string, string> = {}): Promise<FleetStream> {
  const controller = new AbortController()
  const response = await fetch(`${url}/gpu/events`, { headers, signal: controller.signal })
  const events: FleetStream['events'] = []
  let state: FleetState | undefined
  let raw = ''
  let pending = ''
  const watchers = new Set<() => void>()

  const apply = (event: string, data: any): void => {
    if (event === 'snapshot') state = data
    if (event === 'change' && state !== undefined) {
      const next: FleetState = { ...state }
      for (const section of SECTIONS) {
        const set = data.set?.[section] as Array<{ id: string }> | undefined
        const remove = data.remove?.[section] as string[] | undefined
        if (set == null && remove == null) continue
        const records = new Map((state[section] as Array<{ id: string }>).map((r) => [r.id, r]))
        for (const id of remove ?? []) records.delete(id)
        for (const r of set ?? []) records.set(r.id, r)
        next[section] = [...records.values()]
      }
      if (data.recent != null) next.recent = data.recent
      else if (data.recentAdded != null) next.recent = [...data.recentAdded, ...state.recent].slice(0, state.recentLimit as number)
      state = next
    }
  }

  const pump = async (): Promise<void> => {
    if (response.body == null) return
    const decoder = new TextDecoder()
    try {
      for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
        const text = decoder.decode(chunk, { stream: true })
        raw += text
        pending += text
        let end: number
        while ((end = pending.indexOf('\n\n')) >= 0) {
          const block = pending.slice(0, end)
          pending = pending.slice(end + 2)
          let event = 'message'
          const data: string[] = []
          for (const line of block.split('\n')) {
            if (line.startsWith('event: ')) event = line.slice(7)
            else if (line.startsWith('data: ')) data.push(line.slice(6))
          }
          if (data.length === 0) continue
          const parsed = JSON.parse(data.join('\n'))
          events.push({ event, data: parsed, at: performance.now() })
          apply(event, parsed)
        }
        for (const w of [...watchers]) w()
      }
    } catch {
      // closed by the test
    }
  }
  void pump()

  return {
    response,
    events,
    state: () => state,
    text: () => raw,
    until: async (ready, ms = 3000, what = 'the fleet stream to show it') => await new Promise((resolve, reject) => {
      const check = (): void => {
        if (state !== undefined && ready(state)) {
          watchers.delete(check)
          clearTimeout(timer)
          resolve(state)
        }
      }
      const timer = setTimeout(() => {
        watchers.delete(check)
        reject(new Error(`timed out after ${ms} ms waiting for ${what}; last state: ${JSON.stringify(state)?.slice(0, 2000)}`))
      }, ms)
      watchers.add(check)
      check()
    }),
    close: () => { controller.abort() }
  }
}
