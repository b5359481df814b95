import fp from 'fastify-plugin'
import fastifyEnv from '@fastify/env'
import { configSources, EnvSchema, resolveConfig, unknownVariables, type Env, type GatewayConfig } from '../services/config/config.js'

declare module 'fastify' {
  interface FastifyInstance {
    maestroEnv: Env
    maestroConfig: GatewayConfig
  }
}

/** Plugin options mirror the variables (`QUEUE_MAX: 5`) and win over the environment and `.env`. */
export type ConfigOptions = Partial<Record<keyof Env, string | number | boolean>> & { dotenv?: boolean }

export default fp<ConfigOptions>(async function config (fastify, opts) {
  const sources = configSources(opts as Record<string, unknown>)
  await fastify.register(fastifyEnv, {
    confKey: 'maestroEnv',
    schema: structuredClone(EnvSchema),
    env: false,
    data: Object.assign({}, ...sources)
  })
  fastify.decorate('maestroConfig', resolveConfig(fastify.maestroEnv))
  const unknown = unknownVariables(sources)
  if (unknown.length > 0) fastify.log.warn({ variables: unknown }, `ignored, not gateway settings: ${unknown.join(', ')}`)
}, { name: 'config', fastify: '5.x' })
