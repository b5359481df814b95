// The background poll of the Ollama upstreams (services/fleet/upstream-poller.ts): health, residency
// from /api/ps and from the gateway's own traffic, one poll in flight per server, no redirects.
import t, { type Test } from 'tap'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import type { Assignment } from '../services/fleet/inventory.js'
import { PREFERRED_MAX, UpstreamPoller } from '../services/fleet/upstream-poller.js'
import { startSimulator, type Simulator } from './helpers/upstream-simulator.js'

async function simulator (t: Test, options: Parameters<typeof startSimulator>[0] = {}): Promise<Simulator> {
  const sim = await startSimulator(options)
  t.teardown(() => sim.close())
  return sim
}

const assignment = (id: string, model: string, url: string, port: number): Assignment => ({
  id, name: `as-${id}`, model, modelKey: model, kind: 'llm', ip: '127.0.0.1', port, url, host: `127.0.0.1:${port}`, gpuIds: [id], capacity: 1, weight: 1, computerName: 'localhost'
})

t.test('the poller: residency from /api/ps and the gateway\'s own traffic; a failed poll is unreachable, never a warm preference', async (t) => {
  const warm = await simulator(t, { models: ['shared', 'solo'], resident: ['shared'] })
  const cold = await simulator(t, { models: ['solo'] })
  const assignments = [assignment('1', 'shared', warm.url, warm.port), assignment('2', 'solo', cold.url, cold.port)]
  const poller = new UpstreamPoller({ assignments: () => assignments, intervalMs: 100, timeoutMs: 500 })
  t.teardown(() => poller.close())
  t.equal(poller.snapshot('1')?.health, 'unknown', 'unknown before the first poll')
  t.equal(poller.isLoaded(assignments[0], 'shared'), false)
  await poller.start()
  t.equal(poller.snapshot('1')?.health, 'up')
  t.ok((poller.snapshot('1')?.polledAt ?? 0) > 0)
  t.equal(poller.isLoaded(assignments[0], 'SHARED:latest'), true, 'loaded, from /api/ps (names matched as the contract says)')
  t.equal(poller.isLoaded(assignments[1], 'solo'), false, 'not loaded')
  poller.noteServed(assignments[1], 'solo')
  t.equal(poller.isLoaded(assignments[1], 'solo'), true, 'served there: loaded')
  await sleep(300)
  t.equal(poller.isLoaded(assignments[1], 'solo'), false, 'until a later poll\'s /api/ps says otherwise (the simulator was never asked to run it)')
  poller.noteUnloaded(assignments[0], 'shared')
  t.equal(poller.isLoaded(assignments[0], 'shared'), false, 'unloaded')
  const before = warm.polls.length + cold.polls.length
  await sleep(550)
  const rounds = (warm.polls.length + cold.polls.length - before) / 6
  t.ok(rounds >= 2 && rounds <= 8, `polled in the background about every 100 ms (${rounds} rounds in 550 ms)`)
  await cold.close()
  await sleep(400)
  t.equal(poller.snapshot('2')?.health, 'unreachable', 'a failed poll shows')
  t.equal(poller.isLoaded(assignments[1], 'solo'), false, 'and gives no warm preference')
  t.same(poller.snapshots().map((s) => s.assignment), ['as-1', 'as-2'])
})


t.test('one poll in flight per server: a slow server is not asked again while it has not answered', async (t) => {
  let inFlight = 0
  let most = 0
  let calls = 0
  const server = http.createServer((req, res) => {
    calls++
    inFlight++
    most = Math.max(most, inFlight)
    setTimeout(() => {
      inFlight--
      res.writeHead(200, { 'content-type': 'application/json' }).end(req.url === '/api/version' ? '{"version":"1"}' : '{"models":[]}')
    }, 150)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { server.closeAllConnections(); server.close() })
  const port = (server.address() as AddressInfo).port
  // Two assignments on the one server: still one poll of it.
  const assignments = [assignment('1', 'a', `http://127.0.0.1:${port}`, port), assignment('2', 'b', `http://127.0.0.1:${port}`, port)]
  const poller = new UpstreamPoller({ assignments: () => assignments, intervalMs: 50, timeoutMs: 1000 })
  t.teardown(() => poller.close())
  await poller.start()
  await sleep(1000)
  t.equal(most, 1, 'never two fetches at once to one server')
  t.ok(calls <= 3 * Math.ceil(1450 / 450) + 3, `${calls} calls in ~1.5 s at 150 ms each: one poll after the other`)
  t.equal(poller.version(), '1')
  t.equal(poller.snapshot('2')?.health, 'up')
})

t.test('the warm preference offers a few loaded candidates, a different few each time, and follows what is loaded', async (t) => {
  const servers = await Promise.all(Array.from({ length: 7 }, async (_, i) => await simulator(t, { models: ['m'], resident: i < 6 ? ['m'] : [] })))
  const candidates = servers.map((sim, i) => assignment(String(i + 1), 'm', sim.url, sim.port))
  const poller = new UpstreamPoller({ assignments: () => candidates, intervalMs: 60_000, timeoutMs: 1000 })
  t.teardown(() => poller.close())
  await poller.start()
  const first = poller.preferredAmong(candidates, 'm')
  t.equal(first.length, PREFERRED_MAX, `at most ${PREFERRED_MAX} of the 6 warm servers`)
  const offered = new Set([...first, ...poller.preferredAmong(candidates, 'm')])
  t.same([...offered].sort(), ['1', '2', '3', '4', '5', '6'], 'the next call offers the others: every warm server gets its turn')
  t.notOk(offered.has('7'), 'the cold server is never preferred')
  for (const a of candidates.slice(0, 4)) poller.noteUnloaded(a, 'm')
  t.same(poller.preferredAmong(candidates, 'm').sort(), ['5', '6'], 'unloaded ones leave the preference at once')
  poller.noteServed(candidates[6], 'm')
  t.same(poller.preferredAmong(candidates, 'm').sort(), ['5', '6', '7'], 'a server the gateway just used joins it')
  t.same(poller.preferredAmong(candidates, 'other'), [], 'per model')
})
