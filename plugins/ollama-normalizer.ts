import fp from 'fastify-plugin'
import { normalizeOllamaBody, type NormalizeResult } from '../services/http/ollama-normalizer.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** Forces `keep_alive` (OLLAMA_KEEP_ALIVE) and a default `stream: true`, leaving every other byte as sent. */
    normalizeOllamaBody: (raw: string, parsed: Record<string, unknown>) => NormalizeResult
  }
}

export default fp(async function ollamaNormalizer (fastify) {
  const keepAlive = fastify.maestroConfig.keepAlive
  fastify.decorate('normalizeOllamaBody', (raw: string, parsed: Record<string, unknown>) =>
    normalizeOllamaBody(raw, parsed, keepAlive))
}, { name: 'ollama-normalizer', dependencies: ['config'], fastify: '5.x' })
