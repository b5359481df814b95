// The gateway as a plugin inside another Fastify app (CONTRACT section 9).
import t from 'tap'
import Fastify from 'fastify'
import fastifyRedis from '@fastify/redis'
import fastifyMysql from '@fastify/mysql'
import { Ollama } from 'ollama'
import maestro from '../app.js'
import { startFleet } from './helpers/gateway.js'
import { REDIS_URL } from './helpers/redis.js'

t.test('registered under a prefix in a host app that has its own redis and mysql decorators', async (t) => {
  const fleet = await startFleet(t, { gpus: [1], upstreams: [{ model: 'm-small', gpus: [0] }] })
  const host = Fastify()
  t.teardown(() => host.close())
  await host.register(fastifyRedis, { url: REDIS_URL })
  await host.register(fastifyMysql, { promise: true, connectionString: fleet.db.url } as any)
  host.setErrorHandler((_err, _request, reply) => reply.code(418).send({ host: 'error handler' }))
  host.get('/host-route', async () => ({ host: true }))
  await host.register(maestro, { prefix: '/llm', dotenv: false, ...fleet.options })
  await host.listen({ port: 0, host: '127.0.0.1' })
  const url = `http://127.0.0.1:${(host.server.address() as any).port}`

  const ollama = new Ollama({ host: `${url}/llm` })
  const chat = await ollama.chat({ model: 'm-small', messages: [{ role: 'user', content: 'hi' }] })
  t.equal(chat.done, true, 'a chat through the prefixed gateway')
  const seen = fleet.upstreams[0].requests.at(-1)!
  t.equal(seen.path, '/api/chat', 'the upstream path has no prefix')

  const streamed: string[] = []
  for await (const part of await ollama.generate({ model: 'm-small', prompt: 'x', stream: true })) streamed.push(part.response ?? '')
  t.ok(streamed.length > 1)

  t.equal(typeof (host as any).redis.ping, 'function', "the host's redis decorator is still its own client")
  t.equal(await (host as any).redis.ping(), 'PONG')
  const [rows] = await (host as any).mysql.query('SELECT 1 AS one')
  t.equal(rows[0].one, 1, "the host's mysql decorator still works")
  t.same(await (await fetch(`${url}/host-route`)).json(), { host: true })
  const missing = await fetch(`${url}/llm/api/chat`, { method: 'POST', body: '{"model":"nope"}' })
  t.equal(missing.status, 404)
  t.same(await missing.json(), { error: "model 'nope' not found" }, "the gateway's errors keep the contract's format")
  t.equal((await fetch(`${url}/llm/`)).status, 200)
  t.same(await fleet.heldGpus(), [])
})
