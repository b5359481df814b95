import fp from 'fastify-plugin'
import fastifyEnv from '@fastify/env'
import { configSources, EnvSchema, resolveConfig, type Env, type GatewayConfig } from '../services/config.js'

declare module 'fastify' {
  interface FastifyInstance {
    maestroEnv: Env
    maestroConfig: GatewayConfig
  }
}

/** Plugin options mirror the variables (`QUEUE_MAX: 5`) and win over the environment and `.env`. */
export type ConfigOptions = Partial<Record<keyof Env, string | number | boolean>> & { dotenv?: boolean }

export default fp<ConfigOptions>(async function config (fastify, opts) {
  await fastify.register(fastifyEnv, {
    confKey: 'maestroEnv',
    schema: structuredClone(EnvSchema),
    env: false,
    data: Object.assign({}, ...configSources(opts as Record<string, unknown>))
  })
  fastify.decorate('maestroConfig', resolveConfig(fastify.maestroEnv))
}, { name: 'config', fastify: '5.x' })
