import type { FastifyPluginAsync } from 'fastify'
import { EventStreamLimit, StreamReader } from '../../services/fleet/fleet-events.js'
import { fleetViewerOf } from '../../services/fleet/fleet-view.js'
import { isLoopbackAddress } from '../../services/clients/loopback.js'
import { clientAddress } from '../../plugins/clients.js'

/**
 * A reader further behind than this (characters waiting to be sent, or a whole snapshot when that
 * is larger) is cut off; its page reconnects. With EVENT_STREAMS_MAX streams that bounds what the
 * feed can hold in memory.
 */
const MAX_BUFFERED_BYTES = 64 * 1024
/** How long an EventSource waits before reconnecting. */
const RETRY_MS = 1000
/** Streams one client (API key, else address) may hold open at once. */
const STREAMS_PER_CLIENT = 10

/**
 * `GET /gpu/events`: the console's state as server-sent events — `snapshot` (the whole fleet),
 * then `change` (records set or removed, keyed by id), `unavailable` while the state cannot be
 * read, and a comment line now and then. Open to all, but each reader is told only what its
 * credential may see (services/fleet/fleet-view.ts).
 */
const gpuEvents: FastifyPluginAsync = async (fastify) => {
  const hub = fastify.fleetEvents.hub
  const config = fastify.maestroConfig
  const streams = new EventStreamLimit(config.eventStreamsMax, STREAMS_PER_CLIENT)

  fastify.get('/gpu/events', { config: { auth: 'open', errorStyle: 'ollama', accessLogLevel: 'debug' } }, async (request, reply) => {
    const credential = request.credential
    const viewer = fleetViewerOf({
      credential,
      secured: config.adminToken != null || fastify.apiKeys.configured,
      loopback: isLoopbackAddress(request.raw.socket.remoteAddress)
    })
    // HEAD (Fastify answers it with this handler): the headers are the whole answer, no place taken.
    const head = request.method === 'HEAD'
    let release = (): void => {}
    if (!head) {
      const client = credential != null && credential !== 'admin' ? `key:${credential.name}` : `addr:${clientAddress(request, config.trustProxy)}`
      const place = streams.take(client)
      if ('refused' in place) return reply.sendError(429, place.refused, 5)
      release = place.release
    }
    reply.hijack()
    const raw = reply.raw
    raw.once('close', release)
    // Gone while the hooks ran: 'close' will not come again, so nothing may be left waiting for it.
    if (request.raw.socket.destroyed) {
      release()
      return
    }
    raw.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache',
      'x-accel-buffering': 'no',
      connection: 'keep-alive'
    })
    if (head) {
      raw.end()
      return
    }
    raw.write(`retry: ${RETRY_MS}\n\n`)
    const reader = new StreamReader(raw, MAX_BUFFERED_BYTES, () => {
      request.log.info('event stream reader too far behind: disconnected')
    }, viewer)
    const leave = hub.subscribe(reader)
    request.raw.socket.setNoDelay(true)
    raw.once('close', leave)
  })
}

export default gpuEvents
