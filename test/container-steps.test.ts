// docker/container-steps.sh: the container image's build and start steps, without a Docker engine (issue 5).
// Two npm installs from the local cache (--prefer-offline) and a build: about 1-2 minutes.
import t from 'tap'
import { execFile } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { writeInventoryFile } from './helpers/embedded.js'
import { startSimulator } from './helpers/upstream-simulator.js'

const SCRIPT = fileURLToPath(new URL('../docker/container-steps.sh', import.meta.url))

t.setTimeout(420_000)

t.test('the image\'s build, production install and start steps pass on a clean copy at HEAD', async (t) => {
  const sim = await startSimulator({ models: ['m:latest'] })
  t.teardown(() => sim.close())
  const inventory = await writeInventoryFile(t, [{ name: 'simulated', model: '*', port: sim.port, gpus: [1] }])
  const started = performance.now()
  const { stdout } = await promisify(execFile)('bash', [SCRIPT], {
    env: { ...process.env, INVENTORY_FILE: inventory, NPM_FLAGS: '--prefer-offline' },
    maxBuffer: 16 * 1024 * 1024
  })
  t.comment(`container steps took ${Math.round((performance.now() - started) / 1000)} s`)
  t.match(stdout, /HEALTHCHECK passed/)
  t.match(stdout, /\/health: 200 \{"status":"ok"/)
  t.match(stdout, /"inventory":\{"source":"file","ok":true/, 'the inventory file was read')
  t.match(stdout, /container steps passed/)
})
