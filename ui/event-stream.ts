/*
 * A server-sent-event stream read with fetch rather than EventSource, which cannot send
 * `Authorization`: what `GET /gpu/events` tells depends on the credential the operator typed in
 * (nothing, an API key, the admin token). It reconnects by itself as an EventSource does, after
 * the server's `retry:` (or its Retry-After when it refused the stream).
 */

export interface EventStreamHandlers {
  /** the stream is open (again) */
  open: () => void
  /** it broke or was refused; it reconnects by itself */
  error: () => void
  /** one event: its name (`message` when unnamed) and its data lines joined */
  event: (name: string, data: string) => void
}

/** Reads `url` with `token` (when not null) until the function it returns is called. */
export function openEventStream (url: string, token: string | null, on: EventStreamHandlers): () => void {
  let stopped = false
  let retryMs = 1000
  let controller: AbortController | undefined
  let timer: number | undefined

  // The event being read: it is dispatched at the blank line that ends it.
  let name = 'message'
  let data: string[] = []
  const line = (text: string): void => {
    if (text === '') {
      if (data.length > 0) on.event(name, data.join('\n'))
      name = 'message'
      data = []
      return
    }
    if (text.startsWith(':')) return
    const colon = text.indexOf(':')
    const field = colon < 0 ? text : text.slice(0, colon)
    let value = colon < 0 ? '' : text.slice(colon + 1)
    if (value.startsWith(' ')) value = value.slice(1)
    if (field === 'event') name = value
    else if (field === 'data') data.push(value)
    else if (field === 'retry' && value !== '' && Number.isInteger(Number(value))) retryMs = Number(value)
  }

  const read = async (body: ReadableStream<Uint8Array>): Promise<void> => {
    const reader = body.getReader()
    const decoder = new TextDecoder()
    let pending = ''
    for (;;) {
      const { value, done } = await reader.read()
      if (done) return
      pending += decoder.decode(value, { stream: true })
      let start = 0
      for (let end = pending.indexOf('\n'); end >= 0; end = pending.indexOf('\n', start)) {
        line(pending.slice(start, end > start && pending[end - 1] === '\r' ? end - 1 : end))
        start = end + 1
      }
      pending = pending.slice(start)
    }
  }

  const connect = async (): Promise<void> => {
    controller = new AbortController()
    let waitMs = retryMs
    try {
      const headers: Record<string, string> = { accept: 'text/event-stream' }
      if (token != null) headers.authorization = `Bearer ${token}`
      const res = await fetch(url, { headers, cache: 'no-store', signal: controller.signal })
      if (!res.ok || res.body == null) {
        const after = Number(res.headers.get('retry-after'))
        if (after > 0) waitMs = after * 1000
        return
      }
      name = 'message'
      data = []
      on.open()
      await read(res.body)
    } catch {
      // broken or stopped: reconnect below, unless stopped
    } finally {
      if (!stopped) {
        on.error()
        timer = window.setTimeout(() => { void connect() }, waitMs)
      }
    }
  }

  void connect()
  return () => {
    stopped = true
    window.clearTimeout(timer)
    controller?.abort()
  }
}
