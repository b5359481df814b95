// Preloaded into a child process (`--import`): writes to HEAP_PEAK_FILE, as JSON, the highest V8
// heap use seen so far (`peak`, sampled every 10 ms: garbage not yet collected included), the
// highest heap use right after a full (mark-compact) collection (`live`: what the process really
// kept), how many full collections there were (`majorGcs`) and the heap's limit (`limit`). With
// --expose-gc, SIGWINCH (a signal the server leaves alone; ignored by default) collects in full at once and adds the heap used after it (`forced`) and a
// count of such answers (`forcedCount`).
import { renameSync, writeFileSync } from 'node:fs'
import { PerformanceObserver, constants } from 'node:perf_hooks'
import { getHeapStatistics } from 'node:v8'

const file = process.env.HEAP_PEAK_FILE
if (file != null) {
  const state = { peak: 0, live: 0, majorGcs: 0, limit: getHeapStatistics().heap_size_limit, forced: 0, forcedCount: 0 }
  // Written aside and renamed into place: a reader polling the file never sees it truncated
  // (writeFileSync empties the file before it writes; a read in between parsed as nothing).
  const write = () => {
    writeFileSync(file + '.tmp', JSON.stringify(state))
    renameSync(file + '.tmp', file)
  }
  const sample = () => {
    const used = getHeapStatistics().used_heap_size
    if (used > state.peak) {
      state.peak = used
      write()
    }
  }
  new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) {
      if (entry.detail?.kind !== constants.NODE_PERFORMANCE_GC_MAJOR) continue
      state.majorGcs++
      state.live = Math.max(state.live, getHeapStatistics().used_heap_size)
      write()
    }
  }).observe({ entryTypes: ['gc'] })
  if (typeof globalThis.gc === 'function') {
    process.on('SIGWINCH', () => {
      globalThis.gc()
      state.forced = getHeapStatistics().used_heap_size
      state.forcedCount++
      write()
    })
  }
  sample()
  setInterval(sample, 10).unref()
}
