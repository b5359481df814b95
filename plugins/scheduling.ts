import fp from 'fastify-plugin'
import type { Assignment } from '../services/fleet/inventory.js'
import { MemoryAffinityMap, RedisAffinityMap, type AffinityMap } from '../services/scheduling/affinity-map.js'
import { LearnedRates, type AnswerTimings } from '../services/scheduling/cost-model.js'
import type { PromptFingerprint } from '../services/scheduling/prefix-fingerprint.js'

/** One leased LLM answer that ended whole, as the scheduler learns from it. */
export interface AnsweredRequest {
  assignment: Assignment
  model: string
  timings: AnswerTimings
}

export interface Scheduling {
  /** Prompt-prefix affinity (CONTRACT 16.2); undefined when AFFINITY_ENTRIES is 0. */
  affinity?: AffinityMap
  /** Per-assignment prefill and load rates, learned from final lines (this replica's share of the traffic). */
  rates: LearnedRates
  /**
   * A lease was granted for this prompt: its server holds the prompt's prefixes from now (written
   * before the answer, so the next turn finds it whatever replica it reaches); `hit`: the map had
   * sent it there (the server's hit rate).
   */
  leased: (assignment: Assignment, model: string, prompt: PromptFingerprint, hit: boolean) => void
  /** An answer ended whole: learn its server's rates, count a load. */
  answered: (answer: AnsweredRequest) => void
}

declare module 'fastify' {
  interface FastifyInstance {
    /** Scheduler v3's shared state: the affinity map and the learned rates (services/scheduling/). */
    scheduling: Scheduling
  }
}

export default fp(async function scheduling (fastify) {
  const config = fastify.maestroConfig
  const options = { entries: config.affinityEntries, ttlMs: config.affinityTtlMs }
  let affinity: AffinityMap | undefined
  if (config.affinityEntries > 0) {
    // in the lease store's Redis, so every replica routes a conversation alike
    affinity = fastify.leaseRedis != null ? new RedisAffinityMap(fastify.leaseRedis.client, config.redisKeyPrefix, options) : new MemoryAffinityMap(options)
  }
  const rates = new LearnedRates()
  fastify.decorate('scheduling', {
    affinity,
    rates,
    leased (assignment: Assignment, model: string, prompt: PromptFingerprint, hit: boolean) {
      affinity?.remember(model, prompt.hashes, prompt.tokens, assignment.id, hit).catch((err: unknown) => {
        fastify.log.warn({ err }, 'affinity map: write failed')
      })
    },
    answered ({ assignment, model, timings }: AnsweredRequest) {
      if (rates.learn(assignment.id, timings)) fastify.metrics.modelLoad(assignment.name, model)
    }
  })
}, { name: 'scheduling', dependencies: ['config', 'redis', 'metrics'], fastify: '5.x' })
