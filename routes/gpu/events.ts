import type { FastifyPluginAsync } from 'fastify'
import { StreamReader } from '../../services/fleet-events.js'

/** A reader further behind than this (bytes waiting to be sent) is cut off; its browser reconnects. */
const MAX_BUFFERED_BYTES = 256 * 1024
/** How long an EventSource waits before reconnecting. */
const RETRY_MS = 1000

/**
 * `GET /gpu/events`: the console's state as server-sent events — `snapshot` (the whole fleet),
 * then `change` (records set or removed, keyed by id), `unavailable` while the state cannot be
 * read, and a comment line now and then. Readable by whoever may read `/gpu/status`.
 */
const gpuEvents: FastifyPluginAsync = async (fastify) => {
  const hub = fastify.fleetEvents.hub

  fastify.get('/gpu/events', { config: { auth: 'open', errorStyle: 'ollama', accessLogLevel: 'debug' } }, async (request, reply) => {
    reply.hijack()
    const raw = reply.raw
    raw.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache',
      'x-accel-buffering': 'no',
      connection: 'keep-alive'
    })
    // HEAD (Fastify answers it with this handler): the headers are the whole answer.
    if (request.method === 'HEAD') {
      raw.end()
      return
    }
    raw.write(`retry: ${RETRY_MS}\n\n`)
    const reader = new StreamReader(raw, MAX_BUFFERED_BYTES, () => {
      request.log.info('event stream reader too far behind: disconnected')
    })
    const leave = hub.subscribe(reader)
    request.raw.socket.setNoDelay(true)
    raw.once('close', leave)
  })
}

export default gpuEvents
