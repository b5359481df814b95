import fp from 'fastify-plugin'
import { UpstreamPoller } from '../services/fleet/upstream-poller.js'

declare module 'fastify' {
  interface FastifyInstance {
    /**
     * The Ollama upstreams as last polled in the background (`UPSTREAM_POLL_MS`): health, residency
     * (`isLoaded`, `noteServed`, `noteUnloaded`) and the fleet's catalogue. Never fetches on a request's path.
     */
    upstreams: UpstreamPoller
  }
}

export default fp(async function upstreamPoller (fastify) {
  const poller = new UpstreamPoller({
    assignments: () => fastify.inventory.current.assignmentsOfKind('llm'),
    intervalMs: fastify.maestroConfig.upstreamPollMs,
    log: fastify.log
  })
  fastify.decorate('upstreams', poller)
  // Started once the app is ready (not while plugins load), so a silent upstream delays nothing.
  fastify.addHook('onReady', async () => { await poller.start() })
  fastify.addHook('onClose', async () => { poller.close() })
}, { name: 'upstream-poller', dependencies: ['config', 'inventory'], fastify: '5.x' })
