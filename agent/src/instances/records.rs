//! The durable side of an instance: reading and writing its record.

use super::{Agent, Instance, InstanceRecord, RecordedState, lock};
use crate::error::AgentError;

impl Agent {
    /// The persisted record of an instance, as stored.
    pub async fn record(&self, name: &str) -> Result<(InstanceRecord, u64), AgentError> {
        self.instance(name)?;
        let store = self.store.clone();
        let owned = name.to_owned();
        let loaded = tokio::task::spawn_blocking(move || store.load::<InstanceRecord>(&owned))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))??;
        let rec = loaded.ok_or_else(|| AgentError::NotFound(name.to_owned()))?;
        Ok((rec.value, rec.revision))
    }

    pub(super) async fn save_record(
        &self,
        name: &str,
        record: &InstanceRecord,
    ) -> Result<(), AgentError> {
        let store = self.store.clone();
        let (name, record) = (name.to_owned(), record.clone());
        tokio::task::spawn_blocking(move || store.save(&name, &record))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))??;
        Ok(())
    }

    /// Saves a record and makes it the instance's current one.
    pub(crate) async fn write_record(
        &self,
        inst: &Instance,
        record: &InstanceRecord,
    ) -> Result<(), AgentError> {
        self.save_record(&inst.name, record).await?;
        lock(&inst.status).record = Some(record.clone());
        Ok(())
    }

    pub(super) async fn remove_record(&self, name: &str) -> Result<(), AgentError> {
        let store = self.store.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || store.remove(&name))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))??;
        Ok(())
    }

    /// Updates the state in an instance's record.
    pub(super) async fn persist_state(
        &self,
        inst: &Instance,
        state: RecordedState,
        detail: &str,
    ) -> Result<(), AgentError> {
        let record = {
            let mut st = lock(&inst.status);
            let Some(record) = st.record.as_mut() else {
                return Ok(());
            };
            record.state = state;
            record.detail = detail.to_owned();
            record.clone()
        };
        self.save_record(&inst.name, &record).await
    }
}
