// Preloaded into a child process (`--import`): writes the highest V8 heap use seen so far to
// HEAP_PEAK_FILE, sampled every 10 ms and after each garbage collection pass the sampler sees.
import { writeFileSync } from 'node:fs'
import { getHeapStatistics } from 'node:v8'

const file = process.env.HEAP_PEAK_FILE
if (file != null) {
  let peak = 0
  const sample = () => {
    const used = getHeapStatistics().used_heap_size
    if (used > peak) {
      peak = used
      writeFileSync(file, String(peak))
    }
  }
  sample()
  setInterval(sample, 10).unref()
}
