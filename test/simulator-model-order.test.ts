// The simulated Ollama's model runners on a full server (OLLAMA_MAX_LOADED_MODELS reached): waiting
// requests keep their arrival order across models, as Ollama's scheduler takes them one at a time.
// Before, a request waiting for room evicted the model another request had just waited for, and
// two models could evict each other before either ran, forever (found by the bench's (h)).
import t from 'tap'
import { ModelRunners } from '../scripts/simulator/ollama-costs.js'

/** `promise`, or a rejection naming `what` if it has not settled within `ms` (a request that never gets its slot). */
async function within<T> (promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms) })
  try {
    return await Promise.race([promise, late])
  } finally {
    clearTimeout(timer)
  }
}

async function until (condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 5000
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setImmediate(resolve))
  }
}

t.test('a model loaded for a waiting request is not evicted by a later request before it runs', async (t) => {
  const runners = new ModelRunners({ numParallel: 1, loadMs: 30, maxLoadedModels: 1 })
  const a1 = await runners.acquire('a', 'a', 4096)
  const b1 = runners.acquire('b', 'b', 4096) // waits: the server is full and a is busy
  runners.release('a', a1.runner, Infinity)
  await until(() => runners.unloads.length === 1, 'a to be evicted for b')
  const a2 = runners.acquire('a', 'a', 4096) // arrives while b loads
  const b = await within(b1, 3000, 'the request for b')
  t.equal(b.runner.name, 'b', 'b ran on the model loaded for it')
  t.ok(b.loaded)
  runners.release('b', b.runner, Infinity)
  const a = await within(a2, 3000, 'the later request for a')
  t.equal(a.runner.name, 'a')
  runners.release('a', a.runner, Infinity)
  t.same(runners.loads.map((l) => l.model), ['a', 'b', 'a'], 'one load each, in arrival order')
})

t.test('a later request for the resident model does not overtake an earlier one waiting for room', async (t) => {
  const runners = new ModelRunners({ numParallel: 1, loadMs: 10, maxLoadedModels: 1 })
  const a1 = await runners.acquire('a', 'a', 4096)
  const order: string[] = []
  const b1 = runners.acquire('b', 'b', 4096).then((got) => { order.push('b1'); return got })
  await new Promise((resolve) => setImmediate(resolve))
  const a2 = runners.acquire('a', 'a', 4096).then((got) => { order.push('a2'); return got })
  runners.release('a', a1.runner, Infinity)
  const b = await within(b1, 3000, 'the request for b')
  runners.release('b', b.runner, Infinity)
  const a = await within(a2, 3000, 'the later request for a')
  runners.release('a', a.runner, Infinity)
  t.same(order, ['b1', 'a2'], 'served in arrival order across models')
})
